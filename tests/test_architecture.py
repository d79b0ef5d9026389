"""The package's rooms and what may import what (docs/architecture.md): every import of every module,
module-level or inside a function, read from the source; no room imports a room above it, and no two
modules import each other (directly or round a longer cycle)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aa_lightning"

#: room -> the rooms it may import (besides itself). A room is a sub-package, or a top-level module.
ALLOWED = {
    "constants": set(),
    "atomic_files": set(),
    "compat": set(),
    "attention": {"compat"},
    "kernels": {"attention", "atomic_files", "compat"},
    "layers": {"attention"},
    "models": {"layers", "attention", "constants", "compat"},
    "viz": set(),
    "data": {"constants", "atomic_files", "compat"},
    "tasks": {"models", "layers", "attention", "data", "constants", "compat"},
    "callbacks": {"layers", "viz", "models", "compat"},
    "training": {"callbacks", "models", "tasks", "data", "layers", "atomic_files", "compat"},
    "commands": set(),
    "predict": {"commands", "models", "layers", "viz", "callbacks", "data", "tasks", "atomic_files", "compat"},
    "export": {"commands", "models", "layers", "attention", "predict", "data", "tasks", "atomic_files", "compat"},
    "__init__": {"attention", "kernels", "layers", "models"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The aa_lightning modules ``path`` imports (relative imports resolved), anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {m for m in found if m == "aa_lightning" or m.startswith("aa_lightning.")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported not in modules and "." in imported:  # `from pkg import name` -> pkg
                imported = imported.rpartition(".")[0]
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_every_room_is_listed():
    rooms = {_room(name) for name in _graph()}
    assert rooms == set(ALLOWED), f"rooms not in ALLOWED (say where they sit): {rooms ^ set(ALLOWED)}"


def test_no_room_imports_a_room_it_may_not():
    wrong = []
    for module, targets in _graph().items():
        room = _room(module)
        for target in targets:
            other = _room(target)
            if other != room and other not in ALLOWED[room] and target != "aa_lightning":
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if target.startswith(node + ".") or node.startswith(target + "."):
                continue  # a package and its own modules (its __init__ imports them)
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("package", sorted({p.parent for p in PACKAGE.rglob("__init__.py")}))
def test_every_package_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 8, f"{package / '__init__.py'}: a docstring saying what the package holds"


# -- private names of the libraries: only in aa_lightning/compat/ ---------------------------------------
LIBRARIES = ("lightning", "pytorch_lightning", "timm", "torchmetrics", "albumentations", "triton", "litdata")
STDLIB_OK = {"os", "pickle", "sys"}  # os._exit, pickle._Pickler: the standard library's documented names


def _private_uses(path: Path) -> list[str]:
    """Private names of LIBRARIES that ``path`` touches: imported (``from lightning.x import _y``, a ``_module``),
    read as an attribute of anything that is not ours (``fit_loop._data_fetcher``), called on ``self`` /
    ``super()`` or overridden where only a library base class defines them (``_sync_dist``)."""
    import importlib
    import inspect

    tree = ast.parse(path.read_text())
    module = importlib.import_module(_module_name(path))
    ours = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | STDLIB_OK
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            mod = node.module or ""
            if mod.split(".")[0] in LIBRARIES:
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or any(part.startswith("_") for part in mod.split(".")):
                    found.append(f"{node.lineno}: from {mod} import {', '.join(a.name for a in node.names)}")
            elif mod.startswith("aa_lightning"):
                ours.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            ours.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            ours.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("aa_lightning"))

    def library_defines(cls: type, name: str) -> bool:
        owners = [base for base in cls.__mro__ if name in vars(base)]
        return bool(owners) and all(base.__module__.split(".")[0] in LIBRARIES for base in owners)

    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    for name, class_node in classes.items():
        cls = getattr(module, name, None)
        if not inspect.isclass(cls):
            continue
        for item in class_node.body:
            if isinstance(item, ast.FunctionDef) and item.name.startswith("_") and not item.name.startswith("__"):
                if any(library_defines(base, item.name) for base in cls.__mro__[1:]):
                    found.append(f"{item.lineno}: {name}.{item.name} overrides a private library method")
        for node in ast.walk(class_node):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            value = node.value
            on_self = isinstance(value, ast.Name) and value.id in ("self", "cls")
            on_super = isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super"
            if (on_self or on_super) and library_defines(cls, node.attr):
                found.append(f"{node.lineno}: {ast.unparse(node)} is a library's private member")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            value = node.value
            if isinstance(value, ast.Name) and (value.id in ("self", "cls", "ctx") or value.id in ours):
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super":
                continue  # judged above, against the class's bases
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_names_of_the_libraries_outside_compat():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "compat":
            continue
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{use}" for use in _private_uses(path)]
    assert not offenders, "private names outside aa_lightning/compat/:\n" + "\n".join(sorted(set(offenders)))
