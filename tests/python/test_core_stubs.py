"""python/lorart/_core.pyi names exactly what the compiled lorart._core exports: every public
function and class (its exception types included), and every public method, property and
attribute of each class. (Regenerate
with `python -m pybind11_stubgen lorart._core -o python`, then `ruff format`, after changing the
bindings.)"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import lorart
from lorart import _core

STUB = Path(lorart.__file__).with_name("_core.pyi")


def stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(STUB.read_text())
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


def module_names() -> tuple[set[str], dict[str, set[str]]]:
    top, members = set(), {}
    for name, value in vars(_core).items():
        if name.startswith("_"):
            continue
        if inspect.isclass(value) and value.__module__.startswith("lorart"):
            top.add(name)
            members[name] = {n for n in vars(value) if not n.startswith("_")}
        elif callable(value) and not inspect.isclass(value):
            top.add(name)
    return top, members


def test_stub_names_every_export_of_the_module():
    stub_top, stub_members = stub_names()
    mod_top, mod_members = module_names()
    assert stub_top == mod_top, (
        f"missing from the stub: {sorted(mod_top - stub_top)}; "
        f"not in the module: {sorted(stub_top - mod_top)}"
    )
    for cls, names in mod_members.items():
        assert stub_members[cls] == names, (
            f"{cls}: missing from the stub: {sorted(names - stub_members[cls])}; "
            f"not in the module: {sorted(stub_members[cls] - names)}"
        )


def test_stub_is_a_valid_python_module_the_package_ships():
    assert STUB.is_file()
    assert STUB.with_name("py.typed").is_file()
    compile(STUB.read_text(), str(STUB), "exec")
