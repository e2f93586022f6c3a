"""The import graph of chatforge: no cycles, and no module imports one of a higher layer.

Every import of a chatforge module counts, at the top of a module or inside a function (a cycle hidden by a
late import is still a cycle). The allowed direction, lowest layer first (a module may import its own layer
and any layer below it):

    0  chatforge (the package), errors, config_merge, config, recipe_config
    1  files, checkpoint, distributed, metrics, optim, rundir, tracking files, processes, records, the optimizer
    2  tokenizer
    3  data.*, demo.*, model.*                                   text, the demo world, the networks
    4  engine, scheduler, slot_cache, row_sampling,              generation on ids, pure loss functions,
       generation_request, losses, next_token_logits             the logits that score tokens
    5  trainer, evaluate                                         the one loop; evaluation
    6  rl.*                                                      rollouts, roles, the update loop
    7  stages.*                                                  each stage's algorithm
    8  steps, demo_steps, comparisons, recipe_eval, pipeline, pipeline_graph, pipeline_config, recipe_plan,
       recipe_steps, report, report_run, report_plots, report_markdown,
       commands.*, compare, serve.*, lm_eval.*, cli, __main__
A new module is given its layer here (the test names a module it does not know).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chatforge"

LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("chatforge", "chatforge.errors", "chatforge.config_merge", "chatforge.config", "chatforge.recipe_config")),
    (1, ("chatforge.files", "chatforge.checkpoint", "chatforge.distributed", "chatforge.metrics", "chatforge.optim", "chatforge.rundir",
         "chatforge.tracking")),
    (2, ("chatforge.tokenizer",)),
    (3, ("chatforge.data", "chatforge.demo", "chatforge.model")),
    (4, ("chatforge.engine", "chatforge.scheduler", "chatforge.slot_cache", "chatforge.row_sampling",
         "chatforge.generation_request", "chatforge.losses", "chatforge.next_token_logits")),
    (5, ("chatforge.trainer", "chatforge.evaluate")),
    (6, ("chatforge.rl",)),
    (7, ("chatforge.stages",)),
    (8, ("chatforge.steps", "chatforge.demo_steps", "chatforge.comparisons", "chatforge.recipe_eval",
         "chatforge.pipeline", "chatforge.pipeline_graph", "chatforge.pipeline_config",
         "chatforge.recipe_plan", "chatforge.recipe_steps", "chatforge.report", "chatforge.report_run", "chatforge.report_plots",
         "chatforge.report_markdown", "chatforge.commands", "chatforge.compare", "chatforge.serve", "chatforge.lm_eval",
         "chatforge.cli", "chatforge.__main__")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer of the longest listed name that is ``module`` or a package above it."""
    best, found = -1, None
    for layer, names in LAYERS:
        for name in names:
            prefix = name != "chatforge" and module.startswith(name + ".")  # the package itself is no prefix
            if (module == name or prefix) and len(name) > best:
                best, found = len(name), layer
    return found


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The chatforge modules ``path`` imports (anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "chatforge"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "chatforge":
            for a in node.names:  # `from chatforge.model import lora` imports the module chatforge.model.lora
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, the first repeated at the end) or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in sorted(graph.items()):
        for t in sorted(targets):
            lm, lt = layer_of(m), layer_of(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{m} (layer {lm}) imports {t} (layer {lt})")
    return bad


def test_every_module_has_a_layer():
    unknown = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not unknown, f"give these modules a layer in tests/test_layers.py LAYERS: {unknown}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_import():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order (see this file's docstring):\n" + "\n".join(bad)


def test_the_checks_can_fail():
    """A cycle and an upward import in a made-up graph are found."""
    graph = {"chatforge.model.load": {"chatforge.model.lora"}, "chatforge.model.lora": {"chatforge.model.load"},
             "chatforge.rl.rollout": {"chatforge.stages.common"}, "chatforge.stages.common": set()}
    assert find_cycle(graph) == ["chatforge.model.load", "chatforge.model.lora", "chatforge.model.load"]
    assert upward_imports(graph) == ["chatforge.rl.rollout (layer 6) imports chatforge.stages.common (layer 7)"]
    assert layer_of("chatforge.data.pretrain") == 3 and layer_of("chatforge") == 0


@pytest.mark.parametrize("module", ["chatforge.stages"])
def test_only_the_top_imports_stages(module):
    """Outside stages/ only the pipeline and the command line import chatforge.stages (issue 18's acceptance)."""
    allowed = ("chatforge.stages", "chatforge.pipeline", "chatforge.cli", "chatforge.commands")
    bad = [m for m, t in import_graph().items() for x in t
           if (x == module or x.startswith(module + ".")) and not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not bad, bad
