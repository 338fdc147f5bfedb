"""The package's structure, read from its imports (every import, also those inside functions): no circles,
no stage importing another stage, each layer importing only the layers below it, files that read in one
sitting."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGES = ("align", "rag")
# The commands: they talk to each other through outputs on disk only (`pipeline` and `cli` reach the stages
# by module name, through importlib).
STAGES = {"align.self_instruct", "align.sft", "align.comparisons", "align.label", "align.reward", "align.ppo",
          "align.evaluate", "align.push", "align.pipeline", "align.cli", "rag.cli"}
# Which layers a layer may import (its own modules always).
ALLOWED = {
    "align.core": set(),
    "align.lm": {"align.core"},
    "align.preferences": {"align.core", "align.lm"},
    "align.instruct": {"align.core", "align.lm"},
    "align.rlhf": {"align.core", "align.lm", "align.preferences"},
    "rag": {"align.core", "align.lm"},
}
# A stage file (and `rag eval`) keeps one skeleton: config -> validate -> data -> model -> loop -> save -> manifest.
STAGE_FILES = {"align.self_instruct", "align.sft", "align.comparisons", "align.label", "align.reward", "align.ppo",
               "align.evaluate", "rag.evaluate", "rag.rescore"}
STAGE_LINES, MODULE_LINES = 450, 600


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, object]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path, known: set[str]) -> set[str]:
    """The package modules `path` imports (`from a.b import c` counts a.b.c when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name not in PACKAGES:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) - {name} for name, path in known.items()}


def layer(name: str) -> str | None:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_stage_imports_another_stage():
    edges = graph()
    crossings = sorted(f"{a} -> {b}" for a, targets in edges.items() if a in STAGES for b in targets if b in STAGES)
    assert crossings == []


def test_layers_import_only_the_layers_below():
    edges = graph()
    violations = []
    for source, targets in sorted(edges.items()):
        own = layer(source)
        if own is None:
            continue
        for target in sorted(targets):
            if target in STAGES:
                violations.append(f"{source} -> {target} (a stage)")
            elif layer(target) != own and layer(target) not in ALLOWED[own]:
                violations.append(f"{source} -> {target}")
    assert violations == []


def test_the_graph_sees_the_imports_it_checks():
    """The checks above would pass on an empty graph: pin a few edges that exist."""
    edges = graph()
    assert "align.rlhf.reward_model" in edges["align.ppo"]
    assert "align.preferences.format" in edges["align.reward"]
    assert "align.core.command" in edges["rag.evaluate"]
    assert "align.core.command" in edges["align.rlhf.reward_model"]  # a function-level import is seen as well
    assert len(edges) > 40


@pytest.mark.parametrize("name", sorted(modules()))
def test_files_read_in_one_sitting(name):
    limit = STAGE_LINES if name in STAGE_FILES else MODULE_LINES
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= limit, f"{name} has {lines} lines (limit {limit}): move a concern into a module of its own"


def test_core_loads_without_torch():
    """The stage contract, its errors and the hub push load without torch, so every command's checks do too."""
    code = ("import sys, align.core.command, align.core.inputs, align.core.outputs, align.core.journal, "
            "align.core.hub, align.core.model_card, align.preferences.format, align.preferences.sources; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
