"""Entry point of every Bazel py_test (tools/pytest.bzl): runs pytest on one test module from its runfiles.

Usage (Bazel passes the arguments): pytest_main.py --markers={fast,slow,all} path/to/test_module.py [pytest args]
`fast` deselects `@pytest.mark.slow` tests, `slow` selects only them. pytest reads the repo's pyproject.toml
from the runfiles, so `pythonpath = [".", "kernels"]` and the markers apply exactly as in a plain pytest run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_MARK_EXPRESSIONS = {"fast": ["-m", "not slow"], "slow": ["-m", "slow"], "all": []}


def _hide_source_tree() -> None:
    """Import repo code only from the runfiles, so a missing BUILD dependency fails here as it should.

    An editable install (`pip install -e .`) makes the source tree importable through a site-packages finder;
    left in place it would supply any module a target forgot to depend on.
    """
    def editable(obj: object) -> bool:
        return (obj if isinstance(obj, type) else type(obj)).__module__.startswith("__editable__")

    sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(getattr(h, "__self__", h))]
    source_root = Path(__file__).resolve().parents[1]  # this file is a runfiles symlink into the source tree
    sys.path[:] = [p for p in sys.path
                   if not p.startswith("__editable__") and not Path(p or ".").resolve().is_relative_to(source_root)]
    sys.path_importer_cache.clear()


def pytest_args(argv: list[str], xml_output: str | None) -> list[str]:
    """pytest's argument list for `argv` (see the module docstring); raises ValueError on a bad --markers."""
    markers, rest = "all", []
    for arg in argv:
        if arg.startswith("--markers="):
            markers = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if markers not in _MARK_EXPRESSIONS:
        raise ValueError(f"--markers={markers}: expected one of {sorted(_MARK_EXPRESSIONS)}")
    args = ["-q", "-p", "no:cacheprovider", *_MARK_EXPRESSIONS[markers], *rest]
    if xml_output:  # per-test-case results for Bazel's test.xml
        args.append(f"--junitxml={xml_output}")
    return args


def main() -> int:
    _hide_source_tree()
    import pytest

    return int(pytest.main(pytest_args(sys.argv[1:], os.environ.get("XML_OUTPUT_FILE"))))


if __name__ == "__main__":
    sys.exit(main())
