"""A node's build steps (platform/build_steps.py): the latest step per build, progress
of one step kept at most every min_interval (a new step and a finished one always),
one short line each; and the step line `thaw deploy` and `thaw fn show` print
(ops/deploy_progress.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from thaw.core.spec import pack_bundle
from thaw.ops.deploy_progress import BuildWatch, function_name, step_line
from thaw.platform.build_steps import MAX_STEP_CHARS, NodeBuildSteps


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


KEY = ("dev", "fn", "3")


def test_progress_of_one_step_is_throttled_and_new_steps_are_not() -> None:
    clock = Clock()
    steps = NodeBuildSteps(clock=clock, min_interval=0.25)
    report = steps.reporter(KEY)
    assert report("storing the snapshot", 0.1)
    clock.now += 0.1
    assert not report("storing the snapshot", 0.2)  # too soon: dropped
    found = steps.get(KEY)
    assert found is not None and found.progress == 0.1
    clock.now += 0.2
    assert report("storing the snapshot", 0.3)  # 0.3 s after the last kept one
    assert report("storing the snapshot", 1.0)  # the end of a step is always kept
    found = steps.get(KEY)
    assert found is not None and found.progress == 1.0
    assert report("preparing a template")  # a new step at once, whatever the time
    found = steps.get(KEY)
    assert found is not None and (found.text, found.progress) == ("preparing a template", None)
    assert report("preparing a template")  # no measure: not throttled


def test_steps_are_one_bounded_line_and_progress_is_a_fraction() -> None:
    steps = NodeBuildSteps()
    steps.set(KEY, "resolving\n  the   environment", 7.0)
    found = steps.get(KEY)
    assert found is not None and (found.text, found.progress) == ("resolving the environment", 1.0)
    steps.set(KEY, "x" * 1000, -1.0)
    found = steps.get(KEY)
    assert found is not None and len(found.text) == MAX_STEP_CHARS and found.progress == 0.0


def test_the_heartbeat_messages_and_the_end_of_a_build() -> None:
    steps = NodeBuildSteps()
    steps.set(KEY, "installing 12 packages", 5 / 12)
    steps.set(("dev", "other", "1"), "running setup()")
    by_name = {m.name: m for m in steps.messages()}
    assert by_name["fn"].version == 3 and by_name["fn"].tenant == "dev"
    assert by_name["fn"].HasField("progress") and abs(by_name["fn"].progress - 5 / 12) < 1e-9
    assert not by_name["other"].HasField("progress")
    steps.end(KEY)
    assert [m.name for m in steps.messages()] == ["other"]
    steps.end(KEY)  # twice: nothing left, no error
    assert steps.get(KEY) is None


def test_the_step_line_names_the_version_and_its_progress() -> None:
    building = {"build_step": "installing 12 packages", "build_progress": 0.4166,
                "latest_build": {"version": 4, "build_step": "installing 12 packages",
                                 "build_progress": 0.4166}}
    assert step_line(building) == "building v4: installing 12 packages (42%)"
    setup = {"build_step": None, "latest_build": {"version": 2, "build_step": "running setup()",
                                                  "build_progress": None}}
    assert step_line(setup) == "building v2: running setup()"
    assert step_line({"build_step": None, "latest_build": {"version": 2}}) is None
    assert step_line({"latest_build": None}) is None


class FakeClient:
    def __init__(self, docs: list[Any]) -> None:
        self.docs = docs
        self.paths: list[str] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self.paths.append(path)
        doc = self.docs.pop(0) if len(self.docs) > 1 else self.docs[0]
        if isinstance(doc, Exception):
            raise doc

        class Reply:
            def json(self) -> Any:
                return doc
        return Reply()


def test_the_deploy_watch_shows_each_new_step_once() -> None:
    def doc(step: str | None) -> dict[str, Any]:
        return {"build_step": step, "latest_build": {"version": 1, "build_step": step}}

    client = FakeClient([RuntimeError("not there yet"), doc("resolving"), doc("resolving"),
                         doc("running setup()"), doc(None)])
    shown: list[str] = []
    done = threading.Event()

    def on_step(line: str) -> None:
        shown.append(line)
        if "setup" in line:
            done.set()

    watch = BuildWatch(on_step, name="fn", interval=0.001,
                       client=lambda: client)  # type: ignore[arg-type,return-value]
    watch.start()
    assert done.wait(30)
    watch.stop()
    assert shown == ["building v1: resolving", "building v1: running setup()"]
    assert set(client.paths) == {"/v1/functions/fn"}


def test_the_watch_reads_the_functions_name_from_its_bundle(tmp_path: Path) -> None:
    folder = tmp_path / "fn"
    folder.mkdir()
    (folder / "thaw.toml").write_text('name = "named-here"\nhandler = "app:H"\n')
    (folder / "app.py").write_text("class H:\n    def __call__(self, r):\n        return {}\n")
    assert function_name(pack_bundle(str(folder))) == "named-here"
    assert function_name(b"not a bundle") is None
