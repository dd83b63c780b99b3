"""The BUILD files match the imports (tools/bazel_deps.py --check), and the checker catches drift it should.

Under Bazel this runs on the runfiles tree (//:repo_sources), under plain pytest on the git work tree.
"""

import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from tools import bazel_deps
from tools.pytest_main import pytest_args

ROOT = Path(__file__).parents[1]  # not resolved: under Bazel, the runfiles copy of the repo


def _tree(root: Path, files: dict[str, str], fast: tuple[str, ...] = ()) -> bazel_deps.Repo:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(dedent(text))
    return bazel_deps.Repo(root, fast=fast)


def test_repo_build_files_match_imports():
    problems = bazel_deps.check(bazel_deps.Repo(ROOT))
    assert not problems, "BUILD files out of step (run `python tools/bazel_deps.py --write`):\n" + "\n".join(problems)


def test_check_reports_module_without_target_and_missing_and_extra_deps(tmp_path):
    repo = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "X = 1\n",
        "pkg/b.py": "from pkg import a\n",
        "pkg/c.py": "import os\n",
        "pkg/BUILD": """\
            py_library(name = "b", srcs = ["b.py"])
            py_library(name = "c", srcs = ["c.py"], deps = [":b"])
            py_library(name = "__init__", srcs = ["__init__.py"])
            """,
    })
    problems = bazel_deps.check(repo)
    assert "pkg/a.py: belongs to no py_library target in pkg/BUILD" in problems
    assert any(p.startswith("//pkg:b: misses a dependency on pkg/a.py (no target yet): pkg/b.py line 1: "
                            "from pkg import a") for p in problems), problems
    assert "//pkg:c: lists //pkg:b, which none of pkg/c.py imports" in problems
    assert len(problems) == 3, problems
    assert bazel_deps.main(["--check", "--root", str(tmp_path)]) == 1

    bazel_deps.write(repo)
    assert bazel_deps.check(bazel_deps.Repo(tmp_path)) == []
    assert bazel_deps.main(["--check", "--root", str(tmp_path)]) == 0
    build = (tmp_path / "pkg/BUILD").read_text()
    assert 'name = "b",\n    srcs = ["b.py"],\n    deps = [":a"],' in build


def test_check_reports_test_module_without_target_and_stale_build_text(tmp_path):
    repo = _tree(tmp_path, {"pkg/a.py": "X = 1\n", "tests/test_a.py": "from pkg.a import X\n",
                            "tools/bazel_fast_tests.txt": "tests/test_a.py  # 1 s\n"})
    bazel_deps.write(repo)
    (tmp_path / "tests/test_b.py").write_text("def test_b():\n    assert True\n")
    want = ["tests/test_b.py: belongs to no pytest_test target in tests/BUILD"]
    assert bazel_deps.check(bazel_deps.Repo(tmp_path)) == want
    (tmp_path / "tests/test_b.py").unlink()
    (tmp_path / "tests/BUILD").write_text((tmp_path / "tests/BUILD").read_text().replace('    tags = ["fast"],\n', ""))
    assert bazel_deps.check(bazel_deps.Repo(tmp_path)) == [
        "tests/BUILD: differs from what --write generates (tags, order or a new package)"]
    (tmp_path / "tools/bazel_fast_tests.txt").write_text("tests/test_a.py\ntests/test_gone.py  # removed\n")
    assert bazel_deps.check(bazel_deps.Repo(tmp_path))[0] == (
        "tests/test_gone.py: listed in tools/bazel_fast_tests.txt but not a module of the repo")


def test_import_resolution(tmp_path):
    # Synthetic names (lib/, src/kpkg/) differ from the real repo's, whose paths this module must not name.
    repo = _tree(tmp_path, {
        "pyproject.toml": '[tool.pytest.ini_options]\npythonpath = [".", "src"]\n',
        "src/kpkg/__init__.py": "",
        "src/kpkg/flash.py": "from . import ref\nfrom .ref import attend\n",
        "src/kpkg/ref.py": "",
        "lib/__init__.py": "",
        "lib/models/__init__.py": "from lib.models.dec import Dec\n",
        "lib/models/dec.py": dedent("""\
            from typing import TYPE_CHECKING
            import numpy as np
            from lib import settings as cfg
            from lib.models.not_written_yet import X
            if TYPE_CHECKING:
                from lib.models import enc
            def lazy():
                import kpkg.flash
            """),
        "lib/models/enc.py": "",
        "lib/settings.py": "",
        "lib/cli.py": "",
        "cfgs/small.py": "",
        "tests/conftest.py": "",
        "tests/worker.py": "import lib.models\n",
        "tests/test_w.py": dedent("""\
            import subprocess, sys
            WORKER = 'worker.py'
            CONFIG = "--config=cfgs/small.py:variant"
            import lib
            def test_cli():
                subprocess.run([sys.executable, "-m", "lib.cli"])
            def test_configs(root):
                assert list((root / "cfgs").glob("*.py"))
            """),
        "cfgs/large.py": "",
    })
    assert set(repo.imports("src/kpkg/flash.py")) == {"src/kpkg/ref.py"}
    assert set(repo.imports("lib/models/dec.py")) == {"lib/settings.py", "src/kpkg/flash.py"}
    assert set(repo.imports("lib/models/__init__.py")) == {"lib/models/dec.py"}
    assert set(repo.imports("tests/test_w.py")) == {"tests/worker.py", "lib/__init__.py", "cfgs/small.py",
                                                    "lib/cli.py", "cfgs/large.py"}
    assert repo.pytest_support("tests/test_w.py") == ["tests/conftest.py"]
    builds = bazel_deps.generate(repo)
    assert 'imports = [".."],' in builds["src/kpkg/BUILD"]
    assert '"//src/kpkg:flash",' in builds["lib/models/BUILD"]


def test_cycles_share_a_target_within_a_package_and_fail_across(tmp_path):
    repo = _tree(tmp_path, {"p/a.py": "from p import b\n", "p/b.py": "def f():\n    from p import a\n"})
    (lib,) = [t for t in bazel_deps.plan(repo)["p"] if t.srcs]
    assert lib.srcs == ("p/a.py", "p/b.py")
    repo = _tree(tmp_path, {"q/c.py": "import p.a\n", "p/b.py": "import q.c\n"})
    with pytest.raises(bazel_deps.BuildError, match="import cycle across packages"):
        bazel_deps.plan(repo)


def test_slow_marked_tests_get_their_own_manual_target(tmp_path):
    repo = _tree(tmp_path, {
        "tests/test_mixed.py": dedent("""\
            import pytest
            def test_quick(): pass
            @pytest.mark.slow
            def test_big(): pass
            """),
        "tests/test_all_slow.py": "import pytest\npytestmark = pytest.mark.slow\ndef test_big(): pass\n",
    }, fast=("tests/test_mixed.py",))
    targets = {t.name: t for t in bazel_deps.plan(repo)["tests"]}
    assert set(targets) == {"test_mixed", "test_mixed_slow", "test_all_slow_slow"}
    assert (targets["test_mixed"].markers, targets["test_mixed"].tags) == ("fast", ("fast",))
    assert (targets["test_mixed_slow"].markers, targets["test_mixed_slow"].tags) == ("slow", ("manual", "slow"))


def test_runner_arguments():
    assert pytest_args(["--markers=fast", "tests/test_x.py"], "/out/test.xml") == [
        "-q", "-p", "no:cacheprovider", "-m", "not slow", "tests/test_x.py", "--junitxml=/out/test.xml"]
    assert pytest_args(["tests/test_x.py"], None) == ["-q", "-p", "no:cacheprovider", "tests/test_x.py"]
    with pytest.raises(ValueError, match="--markers=quick"):
        pytest_args(["--markers=quick", "t.py"], None)


def test_runner_hides_the_source_tree():
    """Under Bazel, a module missing from a target's deps must not be importable via `pip install -e .`'s finder."""
    code = dedent("""\
        import sys
        sys.path.insert(0, sys.argv[1])
        class EditableFinder:
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                return None
        EditableFinder.__module__ = "__editable___mm_finder"
        sys.meta_path.append(EditableFinder)
        sys.path.append("__editable__.mm.finder.__path_hook__")
        from tools import pytest_main
        pytest_main._hide_source_tree()
        assert EditableFinder not in sys.meta_path
        assert not [p for p in sys.path if p.startswith("__editable__") or p == sys.argv[1]], sys.path
        print("hidden")
        """)
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout == "hidden\n", out.stderr


def test_target_names_never_collide(tmp_path):
    repo = _tree(tmp_path, {"pkg/pkg.py": "", "pkg/sources.py": "", "pkg/test_pkg.py": "import pkg.pkg\n"})
    names = [t.name for t in bazel_deps.plan(repo)["pkg"]]
    assert sorted(names) == ["pkg", "pkg-all", "sources", "test_pkg"]
    assert 'name = "package-files",' in bazel_deps.generate(repo)["pkg/BUILD"]
