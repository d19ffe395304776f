"""Dependencies point one way: model <- onegen (platform) <- pipelines, training <- onegen.cli (commands, demo).

Read from the source with `ast` (every import, also the lazy ones inside functions), so a violation fails here
rather than in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package (or module prefix) -> what it must never import
FORBIDDEN = {
    "model": ("onegen", "pipelines", "training"),
    "onegen": ("pipelines", "training", "onegen.cli"),  # the platform layer; onegen.cli itself is checked below
    "pipelines": ("training", "onegen.cli"),
    "training": ("pipelines", "onegen.cli"),
}
ENTRY_POINTS = ("onegen/cli", "onegen/__main__.py", "onegen/jobs")  # on top: may import everything


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return [path for path in sorted((REPO / package).rglob("*.py"))
            if not str(path.relative_to(REPO)).startswith(ENTRY_POINTS)]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up_or_sideways(package):
    bad = []
    for path in sources(package):
        for name in imported_modules(path):
            for forbidden in FORBIDDEN[package]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert bad == []


def test_the_checker_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipelines.record import Sample\n    import training.x\n")
    assert {"pipelines.record", "pipelines.record.Sample", "training.x"} <= imported_modules(module)
