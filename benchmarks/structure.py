"""The package's shape, measured: what the architecture issue tracks.

    python -m benchmarks.structure [--json]

- string dispatch sites: comparisons of a runtime or mode against a string literal
  (``runtime == "docker"``, ``mode in ("exec", ...)``) outside the runtime table;
- import cycles between modules of the package (imports inside functions count too);
- the largest modules (lines);
- the share of imports that sit inside functions.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hpc_kernels"
RUNTIME_WORDS = {"apptainer", "docker", "podman", "singularity", "exec", "instance", "job"}
DISPATCH_NAMES = {"runtime", "mode", "name", "kind"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_dispatch(node: ast.Compare) -> bool:
    def names(n: ast.AST) -> set[str]:
        if isinstance(n, ast.Attribute):
            return {n.attr}
        if isinstance(n, ast.Name):
            return {n.id}
        return set()

    def literals(n: ast.AST) -> set[str]:
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            return {n.value}
        if isinstance(n, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in n.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        return set()

    sides = [node.left, *node.comparators]
    subject = set().union(*(names(s) for s in sides))
    words = set().union(*(literals(s) for s in sides))
    return bool(subject & DISPATCH_NAMES) and bool(words & RUNTIME_WORDS)


def measure() -> dict[str, object]:
    """All the figures, as data."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    dispatch: list[str] = []
    imports_total = imports_inside = 0
    sizes = {}
    for name, path in mods.items():
        text = path.read_text()
        sizes[name] = len(text.splitlines())
        tree = ast.parse(text)
        inside: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(fn):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        inside.add(id(sub))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and _is_dispatch(node):
                dispatch.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports_total += 1
                imports_inside += id(node) in inside
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif node.module:
                    base = node.module
                    if node.level:
                        pkg = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")
                        base = ".".join([*pkg, node.module]) if pkg else node.module
                    targets = [base] + [f"{base}.{a.name}" for a in node.names]
                for target in targets:
                    if target in mods and target != name:
                        graph[name].add(target)
    return {
        "string_dispatch_sites": len(dispatch),
        "dispatch_where": dispatch,
        "import_cycles": cycles(graph),
        "largest_modules": sorted(sizes.items(), key=lambda kv: -kv[1])[:5],
        "modules": len(mods),
        "imports": imports_total,
        "imports_inside_functions": imports_inside,
        "inside_share": round(imports_inside / imports_total, 3) if imports_total else 0.0,
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the figures (or JSON)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structure", description=__doc__)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    data = measure()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"modules: {data['modules']}")
    print(f"string dispatch sites: {data['string_dispatch_sites']}")
    found = data["import_cycles"]
    print(f"import cycles: {len(found) if isinstance(found, list) else found}  {found}")
    print(f"largest modules: {data['largest_modules']}")
    share = f"{data['imports_inside_functions']}/{data['imports']} ({data['inside_share']:.0%})"
    print(f"imports inside functions: {share}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
