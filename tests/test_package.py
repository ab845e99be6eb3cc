"""The package's floors (edm/__init__.py, docs/design.md): a module imports only from its own floor or those below."""

import ast
from pathlib import Path

import edm

PACKAGE = Path(edm.__file__).parent
# edm/__init__.py's floors, lowest first; a module's floor is its first name under edm.
FLOORS = [{"choices", "hardware", "files", "progress"}, {"provenance"}, {"latent"}, {"core"}, {"networks"}, {"data"},
          {"models"}, {"generation"}, {"evaluation"}, {"training"}, {"cli", "train"}]
EXCEPTIONS = {("core.precond", "networks.edm2")}  # EDM2's uncertainty head from its magnitude-preserving layers


def floor(name: str) -> int:
    """The floor of an edm module; a name of the package itself (`from .. import __version__`) is the top floor's,
    since edm/__init__.py imports from every floor."""
    return next((i for i, names in enumerate(FLOORS) if name.split(".")[0] in names), len(FLOORS) - 1)


def test_every_module_of_the_package_is_on_a_floor():
    """A new module or folder is placed on a floor (FLOORS), so that the check below sees its imports."""
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} <= set().union(*FLOORS), tops - set().union(*FLOORS)


def imported_modules(path: Path) -> set[str]:
    """The edm modules a file imports (names relative to edm), relative imports resolved, lazy ones included."""
    package = list(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            names = [".".join(base + node.module.split("."))] if node.module else [".".join(base + [a.name]) for a in node.names]
            found.update(n for n in names if n)
        elif isinstance(node, ast.ImportFrom) and node.module == "edm":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edm."):
            found.add(node.module.removeprefix("edm."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("edm.") for a in node.names if a.name.startswith("edm."))
    return found


def test_every_module_imports_only_from_its_own_floor_or_the_floors_below():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        if module == "__init__":
            continue  # the package re-exports its public API from every floor
        for target in imported_modules(path):
            if floor(target) > floor(module) and (module, target) not in EXCEPTIONS:
                upward.append(f"{module} imports {target}")
    assert not upward, upward


def test_the_floor_check_resolves_relative_imports(tmp_path, monkeypatch):
    """The check above sees an upward import, absolute or relative, top-level or inside a function."""
    fake = tmp_path / "edm"
    (fake / "core").mkdir(parents=True)
    source = ("from ..training.loop import train\ndef f():\n    from .. import models\n    import edm.cli.train\n"
              "from edm import generation\n")
    (fake / "core" / "x.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert imported_modules(fake / "core" / "x.py") == {"training.loop", "models", "cli.train", "generation"}


def test_the_design_pages_layout_names_every_module():
    """docs/design.md's "Layout and the import graph" names each module: a top-level one as edm/NAME.py, one in a
    folder in that folder's entry (edm/cli/'s modules are its commands, one each)."""
    import re

    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    block = text.split("## Layout and the import graph", 1)[1].split("```")[1]
    entries = {m.group(1): m.group(0) for m in re.finditer(r"^edm/(\w+)/.*?(?=^\S)", block, flags=re.M | re.S)}
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if path.name == "__init__.py" or parts[0] == "cli":
            continue
        if len(parts) == 1:
            named = f"edm/{path.name}" in block
        else:
            named = re.search(rf"(?<![\w/]){path.stem}(\.py)?\b", entries.get(parts[0], "")) is not None
        missing += [] if named else ["/".join(parts)]
    assert not missing, f"docs/design.md's layout does not name {', '.join(missing)}: add each to its floor's entry"
