"""The project's import graph read from the source (every import, late ones too): which project files a
module runs when imported. Used to check dvc.yaml's deps and the layout's seams."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("pipelines", "gal_core", "benchmarks")
GAL_CORE = ROOT / "packages" / "gal_core" / "src"


def module_file(name: str) -> Path | None:
    base = GAL_CORE if name.split(".")[0] == "gal_core" else ROOT
    path = base.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=None)
def imports(path: Path) -> frozenset[Path]:
    """Project files ``path`` imports (at any depth of the module, late imports too), with the packages'
    __init__ files that importing them runs."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name.split(".")[0] not in PROJECT:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c runs a/__init__ and a/b/__init__ too
                file = module_file(".".join(parts[:i]))
                if file is not None:
                    found.add(file)
    return frozenset(found)


def closure(files: set[Path]) -> set[Path]:
    todo, seen = list(files), set()
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(imports(file))
    return seen
