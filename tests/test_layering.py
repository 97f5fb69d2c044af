"""The package graph runs one way: model → compiler → relax_passes → schedules; artifacts hold the format only; the
runtime reads artifacts.  Every ``import blockffn.…`` counts, also one inside a function (a lazy import is still a
dependency)."""

import ast
from pathlib import Path

import blockffn

ROOT = Path(blockffn.__file__).parent

# package -> packages it must never import (why: the layering; a deploy machine runs the runtime and
# artifacts without the compiler, the trainer or PyTorch)
FORBIDDEN = {
    "runtime": {"compiler", "train", "relax_passes", "schedules"},
    "artifacts": {"compiler", "runtime", "train", "relax_passes", "schedules", "cli"},
    "schedules": {"compiler", "relax_passes", "runtime", "train", "cli"},
    "relax_passes": {"compiler", "runtime", "train", "cli"},
    "model": {"compiler", "relax_passes", "schedules", "runtime", "artifacts", "train", "cli"},
    "targets": {"compiler", "relax_passes", "schedules", "runtime", "train", "model", "cli"},
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the files where it happens."""
    edges: dict[tuple[str, str], list[str]] = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if len(rel.parts) < 2:
            continue  # top-level modules (errors, sampling_params) are shared leaves
        src = rel.parts[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("blockffn.") and (dst := package_of(name)) != src and (ROOT / dst).is_dir():
                    edges.setdefault((src, dst), []).append(str(rel))
    return edges


def test_no_forbidden_import_edges():
    bad = [f"{src} -> {dst} ({', '.join(sorted(set(files)))})" for (src, dst), files in import_edges().items()
           if dst in FORBIDDEN.get(src, ())]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst in import_edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(f"{a} <-> {b}" for a, deps in graph.items() for b in deps if a < b and reaches(b, a, set()))
    assert not cycles, "package import cycles: " + ", ".join(cycles)


def test_the_walk_sees_imports():
    """The walk finds known edges (a walk that saw nothing would pass the tests above)."""
    edges = import_edges()
    assert ("compiler", "relax_passes") in edges and ("runtime", "artifacts") in edges
    assert any("onnx_import.py" in f for f in edges[("compiler", "relax_passes")])  # a function-level import
