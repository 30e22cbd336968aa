"""`thaw bench …`: benchmarks printing one JSON object (DESIGN.md §10)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from thaw.core.units import parse_size
from thaw.ops.services import LocalPlatform


def _local_platform(home: Path, host_devices: str) -> LocalPlatform:
    """The platform the end-to-end benchmarks measure: `thaw up`'s, on a free port."""
    return LocalPlatform(home, gateway_port=0, host_devices=host_devices)


@click.group()
def bench() -> None:
    """Measure restore bandwidth, cold starts and the platform's overhead (figures side by
    side, one run)."""


@bench.command()
@click.option("--size", default=None,
              help="State size to restore [default: 2GiB; 1GiB with --tier disk].")
@click.option("--workers", type=int, default=None, help="Copy threads (default: all cores).")
@click.option("--device", type=click.Choice(["host", "cuda"]), default="host",
              show_default=True,
              help="host: into a host slice vs a plain memcpy; cuda: into a GPU slice vs "
                   "the pinned host-to-device ceiling (needs CuPy and a GPU).")
@click.option("--tier", type=click.Choice(["pinned", "disk"]), default="pinned",
              show_default=True,
              help="disk (with --cold): from the disk tier, page cache dropped, vs the "
                   "device's O_DIRECT sequential read (dd) in the same run.")
@click.option("--cold", is_flag=True, help="Drop the chunks' page cache first (--tier disk).")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Where the disk-tier bench writes (default: the temp dir).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def restore(size: str | None, workers: int | None, device: str, tier: str, cold: bool,
            directory: Path | None, as_json: bool) -> None:
    """Restore a state from the pinned tier into a slice vs the copy it cannot beat (or,
    with --tier disk --cold, from the disk tier vs the device's read bandwidth)."""
    if tier == "disk":
        if not cold or device != "host":
            raise click.UsageError("--tier disk is measured with --cold, into a host slice")
        from thaw.bench.disk_restore import run_disk_restore_bench

        click.echo(json.dumps(run_disk_restore_bench(parse_size(size or "1GiB"), workers,
                                                     directory=directory)))
        return
    size = size or "2GiB"
    if device == "host":
        from thaw.bench.restore import run_restore_bench

        click.echo(json.dumps(run_restore_bench(parse_size(size), workers)))
        return
    from thaw.bench.restore_cuda import run_cuda_restore_bench_here

    click.echo(json.dumps(run_cuda_restore_bench_here(parse_size(size), workers)))


@bench.command()
@click.option("--size", default="1.4GB", show_default=True,
              help="Weights to load (GPT-2-medium-shaped float32 tensors).")
@click.option("--rounds", default=2, show_default=True,
              help="Cold and warm loads of each loader (best is reported).")
@click.option("--workers", type=int, default=None, help="thaw's copy threads "
              "(default: all cores).")
@click.option("--loader", "loaders", multiple=True,
              help="Only this peer loader (repeatable; default: all).")
@click.option("--dir", "folder", default=None, type=click.Path(file_okay=False),
              help="Where the weights are written (default: the temp dir; a real disk, "
                   "not tmpfs, for cold figures).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def loaders(size: str, rounds: int, workers: int | None, loaders: tuple[str, ...],
            folder: str | None, as_json: bool) -> None:
    """The same weights loaded by thaw's snapshot restore and by the loaders users pick
    instead (safetensors, torch.load mmap, tensorizer, Run:ai streamer,
    fastsafetensors), page cache cold and warm."""
    from thaw.bench.loaders import run_loaders_bench

    click.echo(json.dumps(run_loaders_bench(parse_size(size), rounds, workers,
                                            only=list(loaders) or None, folder=folder)))


@bench.command()
@click.option("--function", "function", default="examples/embed", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="Bundle folder to measure.")
@click.option("--rounds", default=3, show_default=True, help="Cold starts of each kind.")
@click.option("--warm-calls", default=10, show_default=True, help="Warm calls timed.")
@click.option("--payload", default='{"text": "hello world"}', show_default=True,
              help="JSON body of every call.")
@click.option("--goal", type=float, default=None,
              help="Start speedup (fresh start / restore start) to report as met "
                   "or missed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def coldstart(function: str, rounds: int, warm_calls: int, payload: str, goal: float | None,
              as_json: bool) -> None:
    """Request-to-response latency through the gateway: restore vs fresh vs warm, with
    each kind's Server-Timing stages."""
    from thaw.bench.coldstart import run_coldstart_bench

    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from exc
    click.echo(json.dumps(run_coldstart_bench(function, rounds, body,
                                              platform=_local_platform,
                                              warm_calls=warm_calls, goal=goal)))


@bench.command()
@click.option("--requests", default=5000, show_default=True,
              help="Timed calls of each kind (direct, through the platform), one at a time.")
@click.option("--concurrency", default=64, show_default=True,
              help="Clients calling at once for the throughput figure.")
@click.option("--duration", default=10.0, show_default=True,
              help="Seconds of the throughput measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def overhead(requests: int, concurrency: int, duration: float, as_json: bool) -> None:
    """What gateway -> agent -> instance adds to a warm null call, vs the instance's
    own unix socket; and calls per second with many clients."""
    from thaw.bench.overhead import run_overhead_bench

    click.echo(json.dumps(run_overhead_bench(requests, concurrency, duration,
                                                 platform=_local_platform)))


@bench.command()
@click.option("--functions", default=10_000, show_default=True,
              help="Functions deployed (each with its snapshot on some nodes).")
@click.option("--nodes", default=1_000, show_default=True, help="Nodes in the cluster.")
@click.option("--decisions", default=20_000, show_default=True,
              help="Placement decisions timed (random functions).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def placement(functions: int, nodes: int, decisions: int, as_json: bool) -> None:
    """How long one cold start's placement decision takes over the scheduler's own
    in-memory state, beside the same decision on a 10-function, 10-node cluster."""
    from thaw.bench.placement import run_placement_bench

    click.echo(json.dumps(run_placement_bench(functions, nodes, decisions)))


@bench.command()
@click.option("--function", "function", default="examples/echo", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="Bundle folder to call.")
@click.option("--calls", default=1000, show_default=True,
              help="Concurrent first calls (one connection each).")
@click.option("--max-instances", default=4, show_default=True,
              help="The function's [scaling] max_instances.")
@click.option("--max-concurrency", default=16, show_default=True,
              help="The function's [scaling] max_concurrency.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def burst(function: str, calls: int, max_instances: int, max_concurrency: int,
          as_json: bool) -> None:
    """Many concurrent first calls to a function at zero instances: latency, how many
    were answered, restores started (from the scheduler's events), vs the same calls
    warm."""
    from thaw.bench.burst import run_burst_bench

    click.echo(json.dumps(run_burst_bench(function, calls, max_instances, max_concurrency,
                                          platform=_local_platform)))


@bench.command()
@click.option("--function", "function", default="examples/embed", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="Bundle folder to copy.")
@click.option("--functions", default=50, show_default=True, help="Copies deployed.")
@click.option("--warm", default=20, show_default=True, help="Copies kept warm.")
@click.option("--instances", default=4, show_default=True,
              help="Warm instances of one copy (the per-instance figure).")
@click.option("--idle", default=6, show_default=True,
              help="Functions deployed with no instance for idle_mb_per_function "
                   "(zygotes on and off); 0 leaves that measurement out.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def density(function: str, functions: int, warm: int, instances: int, idle: int,
            as_json: bool) -> None:
    """Memory each extra warm instance of a model adds on one node (with and without
    restored templates), each extra warm copy, the time to bring one more copy up
    from zero, and what a deployed idle function costs (with and without zygotes)."""
    from thaw.bench.density import run_density_bench
    from thaw.bench.density_idle import run_idle_density_bench

    report = run_density_bench(function, functions, warm, platform=_local_platform,
                               instances=instances)
    if idle > 0:
        idle_report = run_idle_density_bench(function, idle, platform=_local_platform)
        report.update({k: v for k, v in idle_report.items()
                       if k not in ("function", "functions")})
        report["idle_functions"] = idle
    click.echo(json.dumps(report))


@bench.command()
@click.option("--duration", default=120.0, show_default=True,
              help="Seconds of soak (longer if need be to try each bad input once).")
@click.option("--concurrency", default=8, show_default=True,
              help="Clients mixing valid calls with bad input.")
@click.option("--slow", default=8, show_default=True,
              help="Slow or silent connections (slowloris) held at once.")
@click.option("--slow-hold", default=45.0, show_default=True,
              help="Seconds a slow connection is held before the bench lets go of it "
                   "(longer than the gateway's header_timeout_seconds).")
@click.option("--function", "function", default="examples/echo", show_default=True,
              type=click.Path(exists=True, file_okay=False),
              help="Bundle folder of the valid calls' first function.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def soak(duration: float, concurrency: int, slow: int, slow_hold: float, function: str,
         as_json: bool) -> None:
    """Valid calls mixed with bad input (oversized heads, slow clients, deep JSON,
    malformed bundles, bad thaw.toml, webhooks to private addresses, bad keys); calls
    by status, the services' RSS and descriptors before and after, and the goals."""
    from thaw.bench.soak import SoakSettings, run_soak_bench

    settings = SoakSettings(duration=duration, concurrency=concurrency, slow=slow,
                            slow_hold=slow_hold)
    click.echo(json.dumps(run_soak_bench(function, settings, platform=_local_platform)))


@bench.command("env")
@click.option("--rounds", default=5, show_default=True, help="Restores of each kind.")
@click.option("--index", default="", help="Package index or wheel folder to measure "
              "(default: a local folder of small wheels the bench writes).")
@click.option("--requirement", "requirements", multiple=True,
              help="A requirement to install from --index (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the only format for now).")
def env_bench(rounds: int, index: str, requirements: tuple[str, ...], as_json: bool) -> None:
    """Per-function environments: build cold and cached, and restores of a function in
    its own environment vs the base one (docs/environments.md)."""
    from thaw.bench.environments import run_environment_bench

    click.echo(json.dumps(run_environment_bench(
        rounds, index, list(requirements) or None, platform=_local_platform)))
