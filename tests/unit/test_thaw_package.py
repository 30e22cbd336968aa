"""`thaw` itself (snapshotter/thawpkg): the public names a function imports, read
lazily, so that importing any part of thaw costs nothing more."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_public_names_are_the_runtimes_own() -> None:
    import thaw
    import thaw.snapshotter.runtime as runtime
    from thaw import HTTPError, Input, InvalidInput

    assert (HTTPError, Input, InvalidInput) == (
        runtime.HTTPError, runtime.Input, runtime.InvalidInput)
    assert {"HTTPError", "Input", "InvalidInput", "Response"} <= set(dir(thaw))
    with pytest.raises(ImportError, match="Nope"):
        from thaw import Nope  # type: ignore[attr-defined]  # noqa: F401


def test_importing_thaw_core_loads_no_runtime_and_platform_is_the_stdlibs() -> None:
    code = ("import sys, thaw.core\n"
            "assert not [m for m in sys.modules if m.startswith('thaw.snapshotter')], "
            "sorted(sys.modules)\n"
            "import thaw.platform.cuda, platform\n"
            "assert platform.__file__.startswith(sys.base_prefix), platform.__file__\n"
            "from thaw import InvalidInput\n"
            "assert 'thaw.snapshotter.runtime' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
