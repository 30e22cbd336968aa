"""Install-time hook: generate the gRPC/protobuf stubs from proto/*.proto.

Everything else about the package lives in pyproject.toml.
"""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        generator = runpy.run_path(str(Path(__file__).parent / "proto" / "generate.py"))
        generator["generate"]()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
