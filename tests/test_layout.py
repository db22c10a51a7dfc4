"""The package's shape, checked: no import cycle between modules, no module importing another's
private name, every analysis registered with a view, every task and method registered once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prunelens"


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, mods: dict[str, Path], top_level_only: bool) -> list[tuple[str, str]]:
    """(module, name) pairs this file imports from the package."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prunelens"):
            assert node.level == 0, f"{path}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, "") if sub in mods else (node.module, a.name))
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.startswith("prunelens")]
    return out


def test_no_import_cycle_between_modules() -> None:
    mods = _modules()
    graph = {m: {dep for dep, _ in _imports(p, mods, top_level_only=True) if dep in mods and dep != m}
             for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_imports_a_private_name_of_another() -> None:
    mods = _modules()
    bad = [f"{m} imports {dep}.{name}" for m, p in mods.items()
           for dep, name in _imports(p, mods, top_level_only=False)
           if name.startswith("_") and name != "__version__" and dep != m]
    assert not bad, bad


def test_every_analysis_is_registered_with_a_page() -> None:
    from prunelens.analyses.base import BUILTIN, analyses

    found = analyses()
    assert len(found) == len(BUILTIN)
    assert {a.name for a in found} == {"analyze", "counterfactual", "compare", "subspace", "paired", "sweep",
                                       "families", "advise"}
    for a in found:
        assert a.html is not None or a.rebuild is not None, a.name
        assert a.schema and a.schema.startswith("prunelens."), a.name


def test_cli_subcommands_come_from_the_registry() -> None:
    from prunelens.analyses.base import analyses
    from prunelens.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {a.name for a in analyses()} <= set(sub.choices)


def test_tasks_registry_knows_every_task_once() -> None:
    from prunelens.tasks.registry import TASKS, get_task, task_kind

    assert {"arc_easy", "mmlu", "gsm8k", "humaneval", "mbpp", "cranfield", "wikitext", "fidelity"} <= set(TASKS)
    assert task_kind("gsm8k") == "generative" and task_kind("boolq") == "multiple-choice"
    assert get_task("retrieval:scifact").kind == "retrieval"
    with pytest.raises(Exception, match="unknown task"):
        get_task("gsm9k")
