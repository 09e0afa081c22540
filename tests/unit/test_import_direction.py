"""Imports between flexlb's process-running packages go one way: ``flexlb.demo`` may import ``flexlb.bench`` and
``flexlb.stack``, ``flexlb.bench`` may import ``flexlb.stack`` only, and ``flexlb.stack`` (the launcher and the local
stack they share) imports neither. Read from the source with ``ast``, so a lazy import inside a function counts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flexlb

PACKAGE_ROOT = Path(flexlb.__file__).parent
RULES = {"bench": ("flexlb.demo",), "stack": ("flexlb.demo", "flexlb.bench")}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module that ``source``, a module of ``package`` (dotted), imports; relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from flexlb import demo`
    return found


def forbidden(imports: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imports if any(name == p or name.startswith(p + ".") for p in prefixes))


def package_of(path: Path) -> str:
    return ".".join(path.parent.relative_to(PACKAGE_ROOT.parent).parts)


@pytest.mark.parametrize("package", sorted(RULES))
def test_a_package_imports_nothing_it_must_not(package: str) -> None:
    files = sorted((PACKAGE_ROOT / package).rglob("*.py"))
    assert files, f"no modules under flexlb/{package}"
    offenders = {}
    for path in files:
        bad = forbidden(imported_modules(path.read_text(), package_of(path)), RULES[package])
        if bad:
            offenders[str(path.relative_to(PACKAGE_ROOT.parent))] = bad
    assert not offenders, f"flexlb.{package} must not import {', '.join(RULES[package])}: {offenders}"


@pytest.mark.parametrize(
    "source",
    [
        "from flexlb.demo.stack import Stack",
        "import flexlb.demo.params",
        "from flexlb import demo",
        "def f():\n    from flexlb.demo import WORKER_OPTIONS\n",
        "from ..demo import params",
    ],
)
def test_every_form_of_a_forbidden_import_is_found(source: str) -> None:
    assert forbidden(imported_modules(source, "flexlb.bench"), RULES["bench"])


def test_allowed_imports_are_not_flagged() -> None:
    source = "from flexlb.stack.local import Stack\nfrom flexlb.bench import client\nimport flexlb.demonstration\n"
    assert forbidden(imported_modules(source, "flexlb.bench"), RULES["bench"]) == []
