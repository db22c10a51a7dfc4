"""The package's shape, checked from every import statement (module level and inside functions):
no import cycle, no import of prunelens inside a function, each layer importing only the layers
below it (the order docs/architecture.md states), no module importing another's private name, and
every analysis, task, method and architecture registered."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from prunelens.analyses.base import ANALYSES, analyses
from prunelens.cli import build_parser
from prunelens.model.arch import ARCHS
from prunelens.prune.base import methods
from prunelens.tasks.registry import TASKS, get_task, task_kind

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "prunelens"

# The layers, bottom to top: a module may import its own layer and the ones before it. The pure-math
# modules inside prune/ and tasks/ belong to the foundations (they know no model).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", ("prunelens.errors", "prunelens.version", "prunelens.registry", "prunelens.runs",
                     "prunelens.render", "prunelens.metrics", "prunelens.divergence", "prunelens.data",
                     "prunelens.prune.sparse",
                     "prunelens.prune.quant", "prunelens.prune.linfit", "prunelens.tasks.scoring",
                     "prunelens.tasks.paired")),
    ("model", ("prunelens.model",)),
    ("prune", ("prunelens.prune",)),
    ("tasks", ("prunelens.tasks",)),
    ("options", ("prunelens.options",)),
    ("analyses", ("prunelens.analyses",)),
    ("shell", ("prunelens.cli", "prunelens.lmeval", "prunelens.testing", "prunelens")),
)


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


class _Imports(ast.NodeVisitor):
    """Every import of prunelens in one file: (imported module, imported name, inside a function?, line)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str, bool, int]] = []
        self.depth = 0

    def _scoped(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scoped

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and node.module.split(".")[0] == "prunelens":
            assert node.level == 0, f"line {node.lineno}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                mod, name = (sub, "") if sub in MODULES else (node.module, a.name)
                self.found.append((mod, name, self.depth > 0, node.lineno))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] == "prunelens":
                self.found.append((a.name, "", self.depth > 0, node.lineno))


def _imports(path: Path) -> list[tuple[str, str, bool, int]]:
    v = _Imports()
    v.visit(ast.parse(path.read_text()))
    return v.found


IMPORTS = {m: _imports(p) for m, p in MODULES.items()}


def layer_of(module: str) -> int:
    """Index of the most specific layer entry that names ``module`` or a package above it."""
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            inside = module.startswith(pre + ".") and pre != "prunelens"  # the package root: __init__ only
            if (module == pre or inside) and len(pre) > best_len:
                best, best_len = i, len(pre)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def test_no_import_cycle_between_modules() -> None:
    graph = {m: {dep for dep, _, _, _ in imps if dep in MODULES and dep != m} for m, imps in IMPORTS.items()}
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


def test_no_import_of_prunelens_inside_a_function() -> None:
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {dep}" for m, imps in IMPORTS.items()
           for dep, _, inner, line in imps if inner]
    assert not bad, "imports of prunelens belong at the top of the file:\n" + "\n".join(bad)


def test_layers_import_only_downward() -> None:
    bad = []
    for m, imps in IMPORTS.items():
        for dep, _, _, line in imps:
            if dep in MODULES and layer_of(dep) > layer_of(m):
                bad.append(f"{m}:{line} ({LAYERS[layer_of(m)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not bad, "\n".join(bad)


def test_the_documented_layers_are_the_tested_ones() -> None:
    """docs/architecture.md's layer table lists the layers in this order."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\w+) \|", doc, flags=re.MULTILINE)
    assert [r for r in rows if r in {name for name, _ in LAYERS}] == [name for name, _ in LAYERS]


def test_no_module_imports_a_private_name_of_another() -> None:
    bad = [f"{m} imports {dep}.{name}" for m, imps in IMPORTS.items() for dep, name, _, _ in imps
           if name.startswith("_") and name != "__version__" and dep != m]
    assert not bad, bad


def test_every_analysis_is_registered_with_a_page() -> None:
    found = analyses()
    assert len(found) == len(ANALYSES)
    assert {a.name for a in found} == {"analyze", "counterfactual", "compare", "subspace", "paired", "sweep",
                                       "families", "advise"}
    for a in found:
        assert a.html is not None or a.rebuild is not None, a.name
        assert a.schema and a.schema.startswith("prunelens."), a.name


def test_cli_subcommands_come_from_the_registry() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert [a.name for a in analyses()] == [c for c in sub.choices if c in {a.name for a in analyses()}]


def test_tasks_registry_knows_every_task_once() -> None:
    assert {"arc_easy", "mmlu", "gsm8k", "humaneval", "mbpp", "cranfield", "wikitext", "fidelity"} <= set(TASKS)
    assert task_kind("gsm8k") == "generative" and task_kind("boolq") == "multiple-choice"
    assert get_task("retrieval:scifact").kind == "retrieval"
    with pytest.raises(Exception, match="unknown task"):
        get_task("gsm9k")


def test_methods_and_architectures_are_registered() -> None:
    names = {m.name for m in methods()}
    assert {"attn", "mlp", "block", "sleb", "magnitude", "wanda", "owl", "sparsegpt", "rtn", "gptq", "awq",
            "repair"} <= names
    assert {"llama", "qwen2", "gemma3_text", "phi3"} <= set(ARCHS)
