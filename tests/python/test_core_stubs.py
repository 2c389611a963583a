"""The stub package python/lorart/_core/ (__init__.pyi, and ops.pyi for the submodule
lorart._core.ops) names exactly what the compiled lorart._core exports: every public function,
class (its exception types included) and submodule, and every public method, property and
attribute of each class. (Regenerate with `python -m pybind11_stubgen lorart._core -o python`,
then `ruff check --fix` and `ruff format`, after changing the bindings.)"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import lorart
from lorart import _core

STUBS = Path(lorart.__file__).with_name("_core")
STUB = STUBS / "__init__.pyi"
SUBMODULES = {"ops": _core.ops}


def stub_names(stub: Path) -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(stub.read_text())
    top, members = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        if isinstance(node, ast.ClassDef):
            names = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
            members[node.name] = {n for n in names if not n.startswith("_")}
    return top, members


def module_names(module) -> tuple[set[str], dict[str, set[str]]]:
    top, members = set(), {}
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        if inspect.isclass(value) and value.__module__.startswith("lorart"):
            top.add(name)
            members[name] = {n for n in vars(value) if not n.startswith("_")}
        elif callable(value) and not inspect.isclass(value):
            top.add(name)
    return top, members


@pytest.mark.parametrize("name", ["", *SUBMODULES])
def test_stub_names_every_export_of_the_module(name):
    module = SUBMODULES[name] if name else _core
    stub_top, stub_members = stub_names(STUBS / f"{name or '__init__'}.pyi")
    mod_top, mod_members = module_names(module)
    assert stub_top == mod_top, (
        f"missing from the stub: {sorted(mod_top - stub_top)}; "
        f"not in the module: {sorted(stub_top - mod_top)}"
    )
    for cls, names in mod_members.items():
        assert stub_members[cls] == names, (
            f"{cls}: missing from the stub: {sorted(names - stub_members[cls])}; "
            f"not in the module: {sorted(stub_members[cls] - names)}"
        )


def test_every_submodule_has_its_stub():
    mods = {n for n, v in vars(_core).items() if inspect.ismodule(v) and not n.startswith("_")}
    assert mods == set(SUBMODULES)
    assert "from . import ops" in STUB.read_text()


def test_stubs_are_valid_python_modules_the_package_ships():
    assert STUBS.with_name("py.typed").is_file()
    assert not STUBS.with_name("_core.pyi").exists()  # one stub of the module: the package
    for stub in (STUB, *(STUBS / f"{n}.pyi" for n in SUBMODULES)):
        assert stub.is_file()
        compile(stub.read_text(), str(stub), "exec")
