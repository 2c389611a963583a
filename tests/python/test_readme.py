"""The README as a user reads it: every Python snippet runs as written, and every ``lorart.X``
name it mentions exists.

Placeholder paths become the demo model and adapters shipped in ``lorart/assets/demo``; a
snippet that names a placeholder this table does not know fails, so new ones get mapped.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import lorart
from lorart import demo

README = Path(__file__).resolve().parents[2] / "README.md"
PLACEHOLDERS = {
    "path/to/llama": demo.DEMO / "model",
    "path/to/model": demo.DEMO / "model",
    "path/to/adapter": demo.DEMO / "lora_zh",
}
_PLACEHOLDER = re.compile(r"path/to/[\w./-]+")


def python_snippets() -> list[tuple[str, str]]:
    """(the heading above it, code) of every ```python block."""
    text = README.read_text(encoding="utf-8")
    snippets, heading = [], "top"
    for match in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```$", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ").strip()
        else:
            snippets.append((heading, match.group(2)))
    return snippets


SNIPPETS = python_snippets()


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 6


@pytest.mark.parametrize(
    "code", [code for _, code in SNIPPETS], ids=[f"{i}-{h}" for i, (h, _) in enumerate(SNIPPETS)]
)
def test_snippet_runs_as_written(code, tmp_path, monkeypatch):
    unknown = set(_PLACEHOLDER.findall(code)) - set(PLACEHOLDERS)
    assert not unknown, f"map these README placeholders in PLACEHOLDERS: {sorted(unknown)}"
    for placeholder, path in PLACEHOLDERS.items():
        code = code.replace(placeholder, str(path))
    monkeypatch.chdir(tmp_path)  # snippets may write relative paths ("out")
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


# `lorart.X.Y` in the text (not in a path such as lorart/assets/demo).
_NAME = re.compile(r"(?<![\w/])lorart((?:\.\w+)+)")


def readme_names() -> list[str]:
    names = {m.group(1)[1:] for m in _NAME.finditer(README.read_text(encoding="utf-8"))}
    return sorted(n for n in names if not n.endswith(("py", "json", "safetensors", "jsonl")))


def resolve(dotted: str) -> object:
    """``lorart.<dotted>`` as attributes first, importing submodules where an attribute is
    missing (``lorart.model`` is a module the package does not import)."""
    obj, path = lorart, "lorart"
    for part in dotted.split("."):
        path = f"{path}.{part}"
        if not hasattr(obj, part):
            importlib.import_module(path)
        obj = getattr(obj, part)
    return obj


def test_readme_mentions_names():
    names = readme_names()
    assert "LLM" in names and "LoraWeights" in names


@pytest.mark.parametrize("name", readme_names())
def test_every_name_the_readme_uses_exists(name):
    resolve(name)


@pytest.mark.parametrize("name", lorart.__all__)
def test_every_public_name_resolves(name):
    assert getattr(lorart, name) is not None
