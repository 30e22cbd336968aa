"""Stubs are generated at install time and never stale."""

import filecmp
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_stubs_match_the_proto_sources(tmp_path: Path) -> None:
    generate = runpy.run_path(str(REPO / "proto" / "generate.py"))["generate"]
    fresh = generate(out_dir=tmp_path)
    assert {p.name for p in fresh} >= {"agent_pb2.py", "scheduler_pb2_grpc.py",
                                       "manifest_pb2.py"}
    for path in fresh:
        installed = REPO / "proto" / path.name
        assert installed.exists(), f"{path.name} missing: run `make install`"
        assert filecmp.cmp(path, installed, shallow=False), (
            f"proto/{path.name} is stale: a .proto changed; run `make install`")


def test_generated_modules_import_as_thaw_proto() -> None:
    from thaw.proto import agent_pb2_grpc, manifest_pb2, scheduler_pb2_grpc

    assert hasattr(agent_pb2_grpc, "AgentStub")
    assert hasattr(scheduler_pb2_grpc, "NodeRegistryStub")
    assert manifest_pb2.SnapshotManifest().format == 0
