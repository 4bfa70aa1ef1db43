"""The package's floors: every import (module-level or inside a function) goes to a strictly lower floor or stays
in its own package, so there is no import circle and nothing below reaches back up. Read from the source with
``ast``; nothing is imported."""

import ast
import pathlib

import jaxnn

ROOT = pathlib.Path(jaxnn.__file__).parent

# Data flows one way (GUIDE.md): config -> data, model, optimizer -> training -> analysis -> the command.
FLOORS = {
    "config": 0, "runtime": 0, "plotting": 0,
    "validation": 1, "runfolders": 1,
    "data": 2, "losses": 2, "models": 2, "parallel": 2, "launch": 2,
    "curvature": 3,
    "optim": 4, "diagnostics": 4, "landscape": 4, "laplace": 4,
    "train": 5,
    "analysis": 6,
    "experiments": 7,
    "cli": 8,
}


def _unit(module: str) -> str | None:
    """``jaxnn.train.fit`` -> ``train``; the package itself (its lazy ``__getattr__``) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "jaxnn" else None


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxnn":
            if node.module == "jaxnn":
                yield from (f"jaxnn.{alias.name}" for alias in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "jaxnn")


def test_every_unit_has_a_floor():
    units = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(FLOORS)


def test_imports_go_down_only():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        unit = relative.parts[0].removesuffix(".py")
        if unit == "__init__":
            continue
        for target in _imports(path):
            other = _unit(target)
            if other is None or other == unit or other not in FLOORS:
                continue
            if FLOORS[other] >= FLOORS[unit]:
                upward.append(f"{relative} imports {target} (floor {FLOORS[unit]} -> {FLOORS[other]})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk finds imports inside functions and through ``from jaxnn import x``."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from jaxnn import train as t\n    import jaxnn.analysis\n")
    assert list(_imports(source)) == ["jaxnn.train", "jaxnn.analysis"]


def test_no_private_name_crosses_a_unit():
    """A name shared between units (``train`` and ``curvature``, ``laplace`` and ``curvature``...) is public."""
    crossing = []
    for path in sorted(ROOT.rglob("*.py")):
        unit = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxnn."):
                if _unit(node.module) != unit:
                    crossing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                                 if a.name.startswith("_")]
    assert not crossing, "\n".join(crossing)
