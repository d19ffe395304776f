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


def is_main_block(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":`, a module's own entry point: it sits on top, like onegen.cli, and may call it."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    tree.body = [node for node in tree.body if not is_main_block(node)]
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


def test_the_checker_allows_only_the_main_block_to_call_the_cli(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import sys\nif __name__ == '__main__':\n    from onegen.cli.build import main\n"
                      "if x == '__main__':\n    import onegen.cli\n")
    assert imported_modules(module) == {"sys", "onegen.cli"}


# ------------------------------------------------------------------------------------------ one thing, one place

PRODUCT_PACKAGES = ("model", "onegen", "pipelines", "training")


def product_sources() -> list[Path]:
    return [path for package in PRODUCT_PACKAGES for path in sorted((REPO / package).rglob("*.py"))]


def test_one_palette_and_one_prompt_tag_formatter():
    """The 20 prompt colours and the `<#HEX name mask: label>` syntax are written in model/tasks.py only; every other
    module (synthetic world, labelers, evaluation) imports them."""
    owner = REPO / "model" / "tasks.py"
    hex_literal = '"#DA70D6"'  # orchid, the palette's last entry
    tag_pattern = "{kind}: "
    for path in product_sources():
        if path == owner:
            continue
        text = path.read_text()
        assert hex_literal not in text.upper(), f"{path.relative_to(REPO)} spells out the palette; import it"
        assert tag_pattern not in text, f"{path.relative_to(REPO)} formats prompt colour tags; use colour_entry"


def test_the_float64_reference_is_test_code():
    for path in product_sources():
        assert "def reference_forward" not in path.read_text(), f"{path.relative_to(REPO)} holds test code"
