"""The shape of the code: lower floors never import upper ones, no import cycles, small modules, and every entry
point (segment, evaluate, the bundle, compare) reaching the one predictor."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medclipsam"
CORE_FLOORS = ("medclipsam.data", "medclipsam.models")
UPPER = ("medclipsam.training", "medclipsam.inference", "medclipsam.methods", "medclipsam.experiments",
         "medclipsam.bundle", "medclipsam.eval", "medclipsam.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """medclipsam modules a file imports (anywhere in it, functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("medclipsam"):
                found.add(name)
    return found


GRAPH = {name: imported(path) - {name} for name, path in MODULES.items()}


def test_data_and_models_import_nothing_from_the_floors_above():
    offenders = {name: sorted(m for m in deps if m.startswith(UPPER))
                 for name, deps in GRAPH.items() if name.startswith(CORE_FLOORS)}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_no_import_cycles_between_modules():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in GRAPH.get(node, ()):
            if other.startswith("medclipsam") and other != "medclipsam":
                if other not in index:
                    visit(other)
                    low[node] = min(low[node], low[other])
                elif other in on_stack:
                    low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert cycles == []


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}


@pytest.mark.parametrize("entry", ["medclipsam.inference.scan_step", "medclipsam.eval.evaluate",
                                   "medclipsam.bundle.inference", "medclipsam.experiments.comparison"])
def test_segment_evaluate_bundle_and_compare_reach_the_one_predictor(entry):
    reached, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += GRAPH.get(name, ())
    assert "medclipsam.inference.predictor" in reached
    assert not {"medclipsam.inference.segment", "medclipsam.inference.manual"} & set(MODULES)  # no second road
