"""Import layering of src/fusionzoo, read with ``ast`` (nothing is imported): the nevers of
docs/design.md ("Layers"), no import cycle, no import statement inside a function.

Each rule reports every violation as ``file:line``. ``KNOWN_VIOLATIONS`` lists, per rule, the
files that still break it and why; a rule's test fails on a violation in a file not listed there
AND on a listed file that no longer breaks the rule, so the list can only shrink (delete the
entry in the same commit that fixes the file).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "fusionzoo"

# The model layer: models and their parts, the registry, and saving/loading weights.
MODEL_LAYER = (
    "fusionzoo.models", "fusionzoo.fusion", "fusionzoo.heads", "fusionzoo.encoders", "fusionzoo.taps",
    "fusionzoo._registry", "fusionzoo.modalities", "fusionzoo.hub", "fusionzoo.weights", "fusionzoo.files",
    "fusionzoo.stream_memo",
    "fusionzoo.detection.models", "fusionzoo.detection.heads", "fusionzoo.detection.boxes",
    "fusionzoo.detection.published",
)
# Model classes and their parts: interpret reaches models only through the registry
# (create_model, from_pretrained), taps and model attributes.
MODEL_CLASSES = (
    "fusionzoo.models", "fusionzoo.detection.models", "fusionzoo.detection.heads", "fusionzoo.heads",
    "fusionzoo.fusion", "fusionzoo.encoders", "fusionzoo.detection.published",
)
APPLICATION = ("fusionzoo.cli", "fusionzoo.commands")

# Optional dependencies (module -> pip distribution) that may be imported inside a function, so
# that the package works without them. A test below checks that none is a required dependency.
OPTIONAL_DEPENDENCIES = {
    "torch.utils.tensorboard": "tensorboard",  # MetricsLogger writes TensorBoard events when installed
}

# rule -> {file (relative to src/fusionzoo): why it still breaks the rule}. Only ever shrinks.
KNOWN_VIOLATIONS: dict[str, dict[str, str]] = {
    "model layer never imports engine, interpret, data, tasks or the CLI": {
    },
    "interpret never imports model classes": {
    },
    "data never imports models, engine or interpret": {},
    "engine never imports interpret or the CLI": {},
    "only the CLI imports fusionzoo.commands; nothing imports fusionzoo.cli": {},
    "no import cycle": {
    },
    "no import statement inside a function": {
    },
}


@dataclass(frozen=True)
class Import:
    """One import statement: ``target`` is the fusionzoo module (or third-party name) it loads."""

    file: str  # relative to src/fusionzoo
    line: int
    importer: str
    target: str
    in_function: bool
    type_checking: bool
    cycle: str = ""  # for the cycle rule: the modules of the cycle this import is an edge of

    def where(self) -> str:
        return f"src/fusionzoo/{self.file}:{self.line}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Absolute module names an import statement loads (``from pkg import sub`` -> ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        base = importer.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        yield sub if sub in MODULES else module


def _imports(name: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(SRC / PACKAGE).as_posix()
    out: list[Import] = []

    def walk(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in dict.fromkeys(_targets(name, path.name == "__init__.py", child)):
                    out.append(Import(rel, child.lineno, name, target, in_function, type_checking))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    walk(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    walk(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
            else:
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                walk(child, inner, type_checking)

    walk(tree, False, False)
    return out


@functools.cache
def _all_imports() -> tuple[Import, ...]:
    """Every import statement of the package, parsed when a test first asks (not at collection, which
    every pytest-xdist worker does: ~0.7 s of parsing each)."""
    return tuple(imp for name, path in MODULES.items() for imp in _imports(name, path))


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _never(importers: tuple[str, ...], forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[Import]:
    return [
        imp for imp in _all_imports()
        if _under(imp.importer, importers) and _under(imp.target, forbidden) and not _under(imp.importer, allowed)
    ]


def _cycles() -> list[Import]:
    """Edges inside strongly connected components (Tarjan) of the fusionzoo import graph.

    An import of ``a.b.c`` also runs ``a.b``'s ``__init__`` first, so it is an edge to every
    package on the way that is not a package of the importer itself (those are already running).
    Function-level imports count; ``if TYPE_CHECKING:`` imports do not (they never run).
    """
    edges: dict[str, list[Import]] = {m: [] for m in MODULES}
    for imp in _all_imports():
        if imp.type_checking or not _under(imp.target, (PACKAGE,)):
            continue
        own = {".".join(imp.importer.split(".")[:i]) for i in range(1, imp.importer.count(".") + 2)}
        parts = imp.target.split(".")
        for i in range(2, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in MODULES and target not in own and target != imp.importer:
                edges[imp.importer].append(Import(imp.file, imp.line, imp.importer, target, imp.in_function, False))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # recursive Tarjan: the graph has ~100 nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in edges[v]:
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in MODULES:
        if v not in index:
            visit(v)
    out = []
    for component in components:
        if len(component) > 1:
            members = ", ".join(sorted(component))
            out += [
                Import(e.file, e.line, e.importer, e.target, e.in_function, False, cycle=members)
                for v in sorted(component) for e in dict.fromkeys(edges[v]) if e.target in component
            ]
    return out


def _function_level() -> list[Import]:
    return [
        imp for imp in _all_imports()
        if imp.in_function and not imp.type_checking and not _under(imp.target, tuple(OPTIONAL_DEPENDENCIES))
    ]


RULES = {
    "model layer never imports engine, interpret, data, tasks or the CLI": lambda: _never(
        MODEL_LAYER, ("fusionzoo.engine", "fusionzoo.interpret", "fusionzoo.data", "fusionzoo.tasks", *APPLICATION)
    ),
    "interpret never imports model classes": lambda: _never(("fusionzoo.interpret",), MODEL_CLASSES),
    "data never imports models, engine or interpret": lambda: _never(
        ("fusionzoo.data",), ("fusionzoo.models", "fusionzoo.detection.models", "fusionzoo.engine", "fusionzoo.interpret")
    ),
    "engine never imports interpret or the CLI": lambda: _never(
        ("fusionzoo.engine",), ("fusionzoo.interpret", *APPLICATION)
    ),
    "only the CLI imports fusionzoo.commands; nothing imports fusionzoo.cli": lambda: _never(
        (PACKAGE,), ("fusionzoo.cli",)
    ) + _never((PACKAGE,), ("fusionzoo.commands",), allowed=APPLICATION),
    "no import cycle": _cycles,
    "no import statement inside a function": _function_level,
}


def _describe(imp: Import, rule: str) -> str:
    where = "inside a function" if imp.in_function else "at module level"
    if rule == "no import cycle":
        return f"{imp.where()}: {imp.importer} -> {imp.target} ({where})"
    return f"{imp.where()}: {imp.importer} imports {imp.target} ({where})"


@pytest.mark.parametrize("rule", list(RULES))
def test_rule(rule: str) -> None:
    violations = RULES[rule]()
    known = KNOWN_VIOLATIONS[rule]
    new = [_describe(v, rule) for v in violations if v.file not in known]
    fixed = sorted(set(known) - {v.file for v in violations})
    message = []
    cycles = dict.fromkeys(v.cycle for v in violations if v.file not in known and v.cycle)
    new += [f"cycle: {members}" for members in cycles]
    if new:
        message.append(f"the rule {rule!r} is broken (docs/design.md, Layers):\n  " + "\n  ".join(new))
    if fixed:
        message.append(
            f"no longer break {rule!r}; delete them from KNOWN_VIOLATIONS in tests/test_layering.py: {fixed}"
        )
    if message:
        pytest.fail("\n".join(message), pytrace=False)


def test_known_violations_name_existing_files_and_rules() -> None:
    assert set(KNOWN_VIOLATIONS) == set(RULES)
    listed = {f for files in KNOWN_VIOLATIONS.values() for f in files}
    missing = sorted(f for f in listed if not (SRC / PACKAGE / f).is_file())
    assert not missing, f"KNOWN_VIOLATIONS names files that do not exist: {missing}"


def test_optional_dependencies_are_not_required() -> None:
    # [project] dependencies of pyproject.toml, read with a regex (tomllib needs Python 3.11).
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    assert block, "pyproject.toml has no [project] dependencies list"
    required = {name.lower() for name in re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block.group(1), re.MULTILINE)}
    assert "torch" in required  # the regex read the list
    wrong = sorted(d for d in OPTIONAL_DEPENDENCIES.values() if d.lower() in required)
    assert not wrong, f"{wrong} are required dependencies (pyproject.toml); import them at module top"


def test_the_parser_sees_the_package() -> None:
    # Guards the rules against a wrong path (no modules -> no violations -> every rule "passes").
    assert {"fusionzoo.cli", "fusionzoo.hub", "fusionzoo.models.base", "fusionzoo.engine.checkpoint"} <= set(MODULES)
    assert any(imp.importer == "fusionzoo.models.base" and imp.target == "fusionzoo.hub" for imp in _all_imports())
