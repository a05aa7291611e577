"""The shape of the package: no import circles, a light ``import mobilenet``, short
modules and functions."""

import ast
import subprocess
import sys
from pathlib import Path

import mobilenet

PACKAGE = Path(mobilenet.__file__).parent
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, at any depth of the file."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            # `from . import x` names a module; `from .m import f` names module m.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodules is not a circle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_circle_finder_finds_circles():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _circle({"p": {"p.m"}, "p.m": {"x"}, "x": set()}) is None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "mobilenet.weights.io" in graph and graph["mobilenet.models.registry"]
    circle = _circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_weights_know_no_task_and_no_model():
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith("mobilenet.weights"):
            outside = {m for m in imported if not m.startswith("mobilenet.weights")}
            leaves = {
                "mobilenet.errors",
                "mobilenet.fileio",
                "mobilenet.integrity",
                "mobilenet.paths",
            }
            assert outside <= leaves, name


def test_import_mobilenet_is_light():
    code = (
        "import sys, mobilenet\n"
        "heavy = ('mobilenet.detection', 'mobilenet.segmentation', 'mobilenet.tasks', "
        "'mobilenet.cli', 'onnx', 'onnxruntime', 'pycocotools', 'skimage', 'sklearn', "
        "'mlxtend')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_detectors_register_on_first_use():
    from mobilenet.models import list_models, model_task

    assert "ssdlite_mobilenet_v3_small" in list_models(task="detection")
    assert model_task("ssdlite_mobilenet_v3_small") == "detection"
    assert "ssdlite_mobilenet_v3_small" not in list_models()  # classifiers by default


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.name} ({len(text.splitlines())})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.name}:{node.name} ({lines})")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
