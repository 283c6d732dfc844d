"""The package layout is a one-way stack (DESIGN.md): a module imports only from layers below its own."""

from __future__ import annotations

import ast
from pathlib import Path

import busgen_lib

PACKAGE = Path(busgen_lib.__file__).parent

# Each layer may import the layers listed for it (and itself); everything may import errors, profiles and parallel.
ALLOWED = {
    "data": set(),
    "diffusion": {"data"},
    "devices": {"data"},
    "evaluate": {"data", "diffusion", "devices", "plotting"},
    "downstream": {"data", "evaluate"},
    "experiments": {"data", "diffusion", "devices", "evaluate", "downstream", "plotting"},
    "reader_study": {"data", "evaluate"},
    "widgets": {"data", "diffusion"},  # the interactive generator sits on top, like plotting (notebooks use it)
}
BASE = {"atomic", "errors", "parallel", "profiles"}


def _imports() -> list[tuple[str, str, str]]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")  # a top-level module is its own layer
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("busgen_lib."):
                found.append((str(path.relative_to(PACKAGE)), layer, node.module.split(".")[1]))
    return found


def test_every_package_imports_only_layers_below_it():
    wrong = [f"{path} imports busgen_lib.{target}" for path, layer, target in _imports()
             if layer in ALLOWED and target != layer and target not in ALLOWED[layer] | BASE]
    assert wrong == []


def test_the_check_sees_the_imports_it_judges():
    seen = {(layer, target) for _, layer, target in _imports()}
    assert ("diffusion", "data") in seen and ("experiments", "downstream") in seen  # the walk found real edges
    assert ("reader_study", "evaluate") in seen


def test_nothing_in_the_library_imports_the_reader_study():
    """The web application sits on top: only cli.py (and notebooks) may start it."""
    wrong = [path for path, layer, target in _imports()
             if target == "reader_study" and layer != "reader_study" and path != "cli.py"]
    assert wrong == []


def test_nothing_in_the_library_imports_the_widgets():
    """ipywidgets is for notebooks: no library module may need it to import."""
    assert [path for path, layer, target in _imports() if target == "widgets" and layer != "widgets"] == []
    assert ("widgets", "diffusion") in {(layer, target) for _, layer, target in _imports()}
