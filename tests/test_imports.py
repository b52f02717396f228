"""The shape of the code: no import circles (function-level imports included), the core never imports the
service, and config.py is a leaf that does not import torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body."""
    files = {}
    for package in ("finetune_core", "service"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
                candidates = [base.rstrip(".")] + [f"{base.rstrip('.')}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            found.update(c for c in candidates if c in files and c != name)
        graph[name] = found
    return graph


def test_no_import_circles():
    graph, state, circles = import_graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []
    assert graph["finetune_core.data"] and graph["finetune_core.images"]  # the graph is really read


def test_the_core_never_imports_the_service():
    graph = import_graph()
    assert [(m, t) for m, targets in graph.items() for t in targets
            if m.startswith("finetune_core") and t.startswith("service")] == []
    assert any(t.startswith("finetune_core") for t in graph["service.schemas"])


def test_config_is_a_leaf_without_torch():
    code = "import finetune_core.config, finetune_core.auto, finetune_core.tables, finetune_core.metadata, sys; " \
           "assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


def test_the_search_process_holds_neither_torch_nor_scikit_learn():
    """Trials train in child processes; the process running the study stays small (torch alone is ~500 MB)."""
    code = "import finetune_core.search, finetune_core.isolated, finetune_core.plots, optuna, sys; " \
           "assert not {'torch', 'sklearn'} & set(sys.modules), sorted({'torch', 'sklearn'} & set(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
