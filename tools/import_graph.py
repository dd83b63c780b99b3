"""The import graph of a package: its cycles (there must be none) and its longest chain.

    python tools/import_graph.py            # mm/: modules, edges, longest chain; exit 1 naming any cycle

Edges are the ones `tools/bazel_deps.py` computes for BUILD files: every `import` of a repo module, also inside
functions (`from mm.convert import registry` is an edge to mm/convert/registry.py), not under
`if TYPE_CHECKING:`; a parent package's `__init__.py` counts only when imported by name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bazel_deps import Repo, sccs  # noqa: E402


def graph(repo: Repo, package: str = "mm") -> dict[str, set[str]]:
    """module file -> the module files of `package` it imports."""
    mods = [f for f in repo.files if f.startswith(package + "/")]
    return {m: {t for t in repo.imports(m) if t.startswith(package + "/")} for m in mods}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other (directly or through others), and self-imports."""
    return [c for c in sccs(sorted(edges), edges) if len(c) > 1 or c[0] in edges.get(c[0], ())]


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest import path (modules in import order, importer first) of an acyclic graph."""
    memo: dict[str, list[str]] = {}

    def chain(m: str) -> list[str]:
        if m not in memo:
            memo[m] = [m] + max((chain(t) for t in sorted(edges.get(m, ()))), key=len, default=[])
        return memo[m]

    return max((chain(m) for m in sorted(edges)), key=len, default=[])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--package", default="mm")
    args = ap.parse_args(argv)
    edges = graph(Repo(args.root), args.package)
    found = cycles(edges)
    print(f"{len(edges)} modules, {sum(len(v) for v in edges.values())} import edges")
    if found:
        for c in found:
            print("cycle: " + " <-> ".join(c))
        return 1
    chain = longest_chain(edges)
    print(f"longest chain ({len(chain)} modules): " + " -> ".join(chain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
