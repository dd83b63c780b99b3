"""mm's import graph (function-level imports counted) has no cycle, and the layers stay in order: the library
imports no application code (`demo_app/`, `launch/`, ...), the checkpoint engine (`mm/checkpoints/`) imports no
family, no family imports the registry, and neither imports model code."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bazel_deps import Repo  # noqa: E402
from import_graph import cycles, graph, longest_chain  # noqa: E402


@pytest.fixture(scope="module")
def edges():
    return graph(Repo(ROOT), "mm")


def test_mm_has_no_import_cycle(edges):
    assert len(edges) > 50  # the whole package was read
    assert cycles(edges) == []
    chain = longest_chain(edges)
    assert all(b in edges[a] for a, b in zip(chain, chain[1:]))  # a real path, importer first


def test_the_engine_imports_no_family_and_no_family_imports_the_registry(edges):
    engine = [m for m in edges if m.startswith("mm/checkpoints/")]
    assert engine and all(not t.startswith("mm/convert/") and not t.startswith("mm/models/")
                          for m in engine for t in edges[m])
    families = [m for m in edges if m.startswith("mm/convert/") and not m.endswith(("registry.py", "__init__.py"))]
    assert families and all("mm/convert/registry.py" not in edges[m] for m in families)


def test_converters_import_no_model_code(edges):
    """Conversions read and write configs (`mm/config.py`) and tensors; the modules that compute (`mm/models/`)
    stay out of `mm.convert` and the engine, directly or through anything they import."""
    start = [m for m in edges if m.startswith(("mm/convert/", "mm/checkpoints/"))]
    seen, todo = set(start), list(start)
    while todo:
        for t in edges[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    assert len(start) > 10 and "mm/config.py" in seen
    assert sorted(m for m in seen if m.startswith("mm/models/")) == []


def test_the_library_imports_no_application_code():
    """`mm` is the library: the demo application (`demo_app/`), the entry points (`launch/`), configs, benchmarks
    and tools build on it, never the other way round (only the kernels package `mm_kernels` is part of it)."""
    repo = Repo(ROOT)
    library = [m for m in repo.files if m.startswith("mm/")]
    outside = {(m, t) for m in library for t in repo.imports(m)
               if not t.startswith(("mm/", "kernels/mm_kernels/"))}
    assert any(m.startswith("demo_app/") for m in repo.files)  # the application was read too
    assert outside == set()


def test_a_function_level_import_cycle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n    return g\n")
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import b\n")
    (tmp_path / "pyproject.toml").write_text("")
    found = graph(Repo(tmp_path, files=["pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/c.py", "pkg/d.py"]), "pkg")
    assert cycles(found) == [["pkg/a.py", "pkg/b.py", "pkg/c.py"]]
    found["pkg/c.py"] = set()  # c no longer imports a: a DAG whose longest chains are a/d -> b -> c
    assert longest_chain(found) == ["pkg/a.py", "pkg/b.py", "pkg/c.py"]
