"""The package's shape: imports point one way (config -> data/models -> train -> run -> inference
-> cli), a handful of modules at the top, none named after a standard-library module."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trainer"

# The layers, lowest first. A module may import its own package and any lower layer; packages on
# the same layer (data and models, say) do not import each other.
LAYERS = {
    "trainer": 0,
    "trainer.registry": 0,
    "trainer.storage": 0,
    "trainer.config": 1,
    "trainer.data": 2,
    "trainer.models": 2,
    "trainer.datasets": 2,
    "trainer.train": 3,
    "trainer.run": 4,
    "trainer.inference": 5,
    "trainer.sweep": 5,
    "trainer.cli": 6,
    "trainer.__main__": 7,
}


def unit(module: str) -> str:
    """The layer table's entry a module belongs to (its package, or itself at the top)."""
    parts = module.split(".")
    for n in (2, 1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise KeyError(f"{module} is in no layer: add its package to LAYERS")


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of this package, at any depth (function-level ones too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "trainer"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "trainer":
            # `from trainer.run import fit` imports the module trainer.run.fit
            found += [
                (node.lineno, f"{node.module}.{a.name}" if node.module.count(".") < 1 else node.module)
                for a in node.names
            ]
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """Every import that points against the layers, as 'module:line: imports target'."""
    problems = []
    for module, text in sorted(sources.items()):
        here = unit(module)
        for line, target in imported(ast.parse(text)):
            there = unit(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                problems.append(f"{module}:{line}: imports {target} ({there} is not below {here})")
    return problems


def package_sources() -> dict[str, str]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path.read_text()
    return out


def test_imports_point_one_way():
    assert violations(package_sources()) == []


def test_the_checker_catches_an_arrow_against_the_layers():
    sources = {
        "trainer.train.loop": "from trainer.run.fit import fit\n",  # up a layer
        "trainer.data.bundle": "def f():\n    from trainer.models import Built\n",  # a sibling, in a function
        "trainer.models.course": "import trainer.inference.predict\n",
        "trainer.run.fit": "from trainer import storage\nfrom trainer.train import loop\n",  # fine: both lower
        "trainer.inference.tta": "from trainer.inference.finished import LoadedRun\n",  # fine: own package
    }
    found = violations(sources)
    assert [p.split(":")[0] for p in found] == ["trainer.data.bundle", "trainer.models.course", "trainer.train.loop"]


def test_a_handful_of_modules_at_the_top_and_none_named_after_the_standard_library():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 5, top
    clashes = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.stem in sys.stdlib_module_names and p.stem != "__main__"
    ]
    assert clashes == []
    assert set(LAYERS) >= {f"trainer.{p.name}" for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
