"""The code's shape, measured: modules per folder, the largest modules, import direction and cycles.

    python -m benchmarks.structure [--json] [--root CHECKOUT]

Reads the source as text (ast), imports nothing of it. The checks the tests enforce live in
tests/test_layering.py; this prints the figures the structure issue asks for.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "pipeline", "storage")
# Which top-level package may import which: jobs -> pipeline -> storage, never back.
ALLOWED = {"jobs": {"jobs", "pipeline", "storage"}, "pipeline": {"pipeline", "storage"}, "storage": {"storage"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, top_level_only: bool) -> set[str]:
    """Project modules `path` imports; with top_level_only, the imports that run when it is imported
    (not those inside functions, which cannot form an import-time cycle)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names}
            # `from pkg import submodule` is an edge to the submodule, not to pkg: a package that imports
            # its own submodules would otherwise always look like a cycle.
            found.update(subs)
            if not any(_is_module(s) for s in subs):
                found.add(base)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports_of(path, name, top_level_only) if m in mods and m != name}
            for name, path in mods.items()}


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if b.split(".")[0] not in ALLOWED[a.split(".")[0]])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def report() -> dict:
    mods = modules()
    per_folder: dict[str, int] = defaultdict(int)
    for path in mods.values():
        per_folder[str(path.parent.relative_to(ROOT))] += 1
    sizes = sorted(((len(p.read_text(encoding="utf-8").splitlines()), str(p.relative_to(ROOT)))
                    for p in mods.values()), reverse=True)
    return {
        "modules_per_folder": dict(sorted(per_folder.items())),
        "largest_modules": [{"lines": n, "path": p} for n, p in sizes[:8]],
        "modules_over_500_lines": [p for n, p in sizes if n > 500],
        "wrong_way_imports": wrong_way(graph(top_level_only=False)),
        "import_cycles": cycles(graph(top_level_only=True)),
    }


def main(argv: list[str] | None = None) -> int:
    global ROOT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--root", type=Path, default=ROOT,
                   help="the checkout to measure (e.g. a `git worktree` of an older commit); default: this one")
    a = p.parse_args(argv)
    ROOT = a.root.resolve()
    r = report()
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    print("modules per folder:")
    for folder, n in r["modules_per_folder"].items():
        print(f"  {folder:<20} {n}")
    print("largest modules:")
    for m in r["largest_modules"]:
        print(f"  {m['lines']:>5}  {m['path']}")
    print(f"modules over 500 lines: {', '.join(r['modules_over_500_lines']) or 'none'}")
    print(f"imports the wrong way (storage -> pipeline/jobs, pipeline -> jobs): "
          f"{', '.join(r['wrong_way_imports']) or 'none'}")
    print(f"import cycles (module level): {'; '.join(' <-> '.join(c) for c in r['import_cycles']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
