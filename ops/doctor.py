"""`thaw doctor gpu`: prove the data path on this machine's GPU. ops/doctor_run.py runs
the checks and assembles the document; ops/doctor_plan.py lists them (ops/doctor_checks.py
for the GPU alone, ops/doctor_platform.py for a local platform on it)."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from thaw.ops.doctor_run import DEFAULT_BUDGET_S, diagnose


@click.group()
def doctor() -> None:
    """Check that this machine can run thaw."""


@doctor.command("gpu")
@click.option("--budget", type=click.FloatRange(min=1), default=DEFAULT_BUDGET_S,
              show_default=True, help="Seconds the whole run may take (each check also "
                                      "has its own limit).")
@click.option("--gpu", "gpu", default=None,
              help="The GPU to check (CUDA index or UUID); default: the first visible one. "
                   "Everything, the local platform included, runs on it alone.")
def gpu_command(budget: float, gpu: str | None) -> None:
    """Prove the snapshot data path on this GPU: driver fingerprint, pinned
    host-to-device bandwidth, slice IPC and zeroing, restores into slices through a
    local platform (examples/embed, a 1.4 GB model, eight at once, a function that
    initialises CUDA at import). Prints one JSON document; exit 0 when every check
    passes, 1 when one fails, 2 without a CUDA device."""
    # Imported here: CuPy, torch and the platform's modules are not needed by other commands.
    from thaw.ops.doctor_checks import CHECK_NAMES, probe_environment
    from thaw.ops.doctor_plan import build_checks

    started = time.monotonic()
    chosen = gpu if gpu is not None else _first_visible_gpu()
    # Before CuPy or torch start CUDA here, and inherited by the platform's processes.
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    env = probe_environment()
    result = diagnose(env.as_json(), env.missing, env.no_device, lambda: build_checks(env),
                      CHECK_NAMES, budget, spent_s=time.monotonic() - started)
    click.echo(json.dumps(result.document, indent=2))
    if result.error:
        click.echo(result.error, err=True)
    sys.exit(result.exit_code)


def _first_visible_gpu() -> str:
    """The first GPU CUDA_VISIBLE_DEVICES names ("" when it hides them all), else 0."""
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        return "0"
    return os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0].strip()
