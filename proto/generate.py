"""Generate the Python stubs for proto/*.proto (run at install time by setup.py).

Stubs are written next to the .proto files as thaw.proto.<name>_pb2 modules. They are
never edited by hand and never committed; tests/test_proto.py regenerates them into a
temporary folder and fails if what is installed differs (a .proto changed and the
stubs were not regenerated).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path = PROTO_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every .proto in proto_dir; returns the files written to out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(proto_dir.glob("*.proto"))
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        # Stage the sources as thaw/proto/*.proto so generated imports read
        # `from thaw.proto import x_pb2` rather than a bare `import x_pb2`.
        staged = Path(tmp, "src", "thaw", "proto")
        staged.mkdir(parents=True)
        for src in sources:
            shutil.copyfile(src, staged / src.name)
        gen = Path(tmp, "gen")
        gen.mkdir()
        include = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{Path(tmp, 'src')}",
            f"-I{include}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
            *[f"thaw/proto/{src.name}" for src in sources],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[s.name for s in sources]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for produced in sorted(Path(gen, "thaw", "proto").iterdir()):
            target = out_dir / produced.name
            shutil.copyfile(produced, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
