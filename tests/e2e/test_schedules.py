"""Cron schedules through the whole platform: the scheduler's real tick (every 0.2 s)
on a clock the test moves forward through a clock file (schedule_clock_file), so no
test waits a real minute. A due time makes a stored invocation with the schedule's
input, run by the gateway like an async call; missed due times are skipped with
events; a redeploy without [schedule] removes it; a bad cron is a 400 naming
schedule.cron."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import FIXTURES, RunningPlatform, running
from thaw.ops.cli import cli
from thaw.ops.services import LocalPlatform

NAME = "scheduled"
# Polls of the invocations list for a scheduled run: a bound for a loaded machine.
POLLS = 600
SETTINGS = {"THAW_SCHEDULE_TICK_SECONDS": "0.2"}


class Clock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0
        path.write_text("0")

    def forward(self, seconds: float) -> None:
        self.offset += seconds
        self.path.write_text(str(self.offset))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[RunningPlatform, Clock, Path]]:
    home = tmp_path_factory.mktemp("schedules-home")
    work = tmp_path_factory.mktemp("schedules-bundles")
    clock = Clock(work / "clock")
    env = {**SETTINGS, "THAW_SCHEDULE_CLOCK_FILE": str(clock.path)}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)  # the scheduler inherits them
        with running(LocalPlatform(home, gateway_port=0, host_devices="1x4GiB")) as started:
            yield started, clock, work


def cli_env(p: RunningPlatform) -> dict[str, str | None]:
    return {"THAW_URL": p.url, "THAW_API_KEY": p.key, "THAW_PROFILE": None}


def bundle(work: Path, name: str, schedule: str) -> Path:
    folder = work / f"{name}-{time.monotonic_ns()}"
    shutil.copytree(FIXTURES / "scheduled", folder)
    (folder / "thaw.toml").write_text(f'name = "{name}"\nhandler = "app:Adder"\n{schedule}')
    return folder


def scheduled_runs(p: RunningPlatform, name: str) -> list[dict[str, Any]]:
    """The function's invocations that its schedules made (a client's are left out)."""
    reply = p.http.get("/v1/invocations", params={"function": name, "source": "schedule"})
    assert reply.status_code == 200, reply.text
    return list(reply.json()["invocations"])


def wait_runs(p: RunningPlatform, name: str, count: int) -> list[dict[str, Any]]:
    """The function's invocations once `count` of them finished."""
    runs: list[dict[str, Any]] = []
    for _ in range(POLLS):
        runs = scheduled_runs(p, name)
        if sum(r["status"] == "succeeded" for r in runs) >= count:
            return runs
        time.sleep(0.1)
    raise AssertionError(f"{count} runs of {name} never finished: {runs}")


def events(p: RunningPlatform, kind: str) -> list[dict[str, Any]]:
    reply = p.http.get("/v1/events", params={"kind": kind, "limit": "1000"})
    assert reply.status_code == 200, reply.text
    return [e for e in reply.json()["events"] if e["function"] == f"dev/{NAME}"]


def test_schedule_runs_skips_and_goes_away(setup: tuple[RunningPlatform, Clock, Path]
                                           ) -> None:
    p, clock, work = setup
    deployed = p.deploy(FIXTURES / NAME)
    assert deployed.status_code == 201, deployed.text
    shown = p.http.get(f"/v1/functions/{NAME}").json()
    [sched] = shown["schedules"]
    assert sched["cron"] == "* * * * *" and sched["input"] == {"a": 5}
    assert sched["next_run_at"] > time.time() - 1

    # The next due time passes on the scheduler's clock: one run, the schedule's input.
    clock.forward(61)
    [run] = wait_runs(p, NAME, 1)
    result = p.http.get(f"/v1/invocations/{run['id']}/result")
    assert result.status_code == 200 and result.json() == {"sum": 7}, result.text
    assert [e["attrs"]["invocation"] for e in events(p, "schedule_ran")] == [run["id"]]

    # The run says which schedule made it, and the schedule says how its last run went.
    [listed] = p.http.get("/v1/schedules", params={"function": NAME}).json()["schedules"]
    assert (listed["function"], listed["cron"], listed["input"]) == (NAME, "* * * * *",
                                                                   {"a": 5})
    assert listed["last_invocation_id"] == run["id"]
    assert listed["last_outcome"] == "succeeded" and listed["last_run_at"]
    assert listed["next_run_at"] > listed["last_run_at"]
    got = p.http.get(f"/v1/invocations/{run['id']}").json()
    assert (got["source"], got["schedule_id"]) == ("schedule", listed["id"])
    # A client's stored call to the same function is a "call", kept apart by the filter.
    call = p.http.post(f"/fn/dev/{NAME}", json={"a": 1},
                       headers={"Prefer": "respond-async"})
    assert call.status_code == 202, call.text
    mine = p.http.get(f"/v1/invocations/{call.json()['id']}").json()
    assert (mine["source"], mine["schedule_id"]) == ("call", None)
    calls = p.http.get("/v1/invocations", params={"function": NAME, "source": "call"})
    assert [i["id"] for i in calls.json()["invocations"]] == [mine["id"]]
    bad = p.http.get("/v1/invocations", params={"source": "cron"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "source"
    shown = CliRunner().invoke(cli, ["schedule", "ls"], env=cli_env(p))
    assert shown.exit_code == 0, shown.output
    assert run["id"] in shown.output and "succeeded" in shown.output, shown.output

    # Ten minutes the scheduler did not see: the newest due time runs, the nine
    # before it are skipped, each with its event, none piled up.
    clock.forward(600)
    runs = wait_runs(p, NAME, 2)
    assert len(runs) == 2
    skipped = events(p, "schedule_skipped")
    assert len(skipped) >= 9
    dues = sorted(float(e["attrs"]["due_at"]) for e in skipped)
    assert all(b - a == 60 for a, b in zip(dues, dues[1:], strict=False))

    # Redeployed without [schedule]: it is gone. Another function's schedule running
    # after the clock moved again shows that ticks went by without this one.
    assert p.deploy(bundle(work, NAME, "")).status_code == 201
    assert p.http.get(f"/v1/functions/{NAME}").json()["schedules"] == []
    other = bundle(work, "scheduled-other", '[schedule]\ncron = "* * * * *"\ninput = {a = 1}\n')
    assert p.deploy(other).status_code == 201
    clock.forward(120)
    wait_runs(p, "scheduled-other", 1)
    assert len(scheduled_runs(p, NAME)) == 2


def test_bad_cron_is_refused_naming_the_field(setup: tuple[RunningPlatform, Clock, Path]
                                              ) -> None:
    p, _, work = setup
    reply = p.deploy(bundle(work, "bad-cron", '[schedule]\ncron = "*/5 * * *"\n'))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["field"] == "schedule.cron" and "5 fields" in error["message"]
