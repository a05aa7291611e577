"""The shape of the package: layers that import only downwards, no import circles, no
private name imported from another module, a light ``import mobilenet``, short functions."""

import ast
import subprocess
import sys
from pathlib import Path

import mobilenet

PACKAGE = Path(mobilenet.__file__).parent
MAX_FUNCTION_LINES = 80
# The layers, lowest first: a module imports its own layer's and lower layers' modules
# only. A name stands for the module or package of that name and everything under it.
LAYERS = (
    ("base", ("errors", "fileio", "integrity", "paths", "machine", "extras", "native")),
    ("weights, data", ("weights", "data")),
    ("nn", ("layers", "blocks", "models", "cost", "limits")),
    ("card, formats", ("card", "deployed", "export", "formats")),
    ("train", ("train",)),
    ("tasks", ("classification", "detection", "segmentation")),
    ("bench, memory, experiments", ("bench", "memory", "experiments")),
    ("cli", ("cli", "__main__")),
)


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
        "heavy = ('mobilenet.detection', 'mobilenet.segmentation', 'mobilenet.classification', "
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


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of a module of the package (None: the package itself)."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    found = [i for i, (_, names) in enumerate(LAYERS) if parts[0] in names]
    assert len(found) == 1, f"{module} belongs to {len(found)} layers: place it in LAYERS"
    return found[0]


def test_every_module_imports_only_its_own_layer_and_those_below():
    climbs = []
    for module, imported in sorted(import_graph().items()):
        here = layer_of(module)
        for target in sorted(imported):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                climbs.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not climbs, "imports up the layers:\n" + "\n".join(climbs)


def test_the_layer_check_sees_a_climb():
    assert layer_of("mobilenet.weights.io") < layer_of("mobilenet.card") < layer_of("mobilenet.cli")
    assert layer_of("mobilenet.formats.onnx") == layer_of("mobilenet.export.onnx")


def test_functions_are_short():
    long_functions = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.name}:{node.name} ({lines})")
    assert not long_functions, long_functions


def _private_imports(source: str, name: str, is_package: bool = False) -> list[str]:
    """``from <a module of the package> import _name`` in ``source`` (module ``name``),
    relative or absolute, at any depth; dunder names (``__version__``) are public."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = here[: len(here) - node.level + 1] if node.level else []
        module = ".".join([*base, *([node.module] if node.module else [])])
        if module.partition(".")[0] != PACKAGE.name:
            continue  # another package's private names (torch.onnx._constants) are its own
        for alias in node.names:
            dunder = alias.name.startswith("__") and alias.name.endswith("__")
            if alias.name.startswith("_") and not dunder:
                found.append(f"{node.lineno}: from {module} import {alias.name}")
    return found


def test_the_private_import_finder_finds_private_imports():
    source = (
        "from .onnx import _check, export_onnx\n"
        "from mobilenet.memory.ops import _Ledger\n"
        "from .. import __version__\n"
        "from torch.onnx import _constants\n"
        "def f():\n"
        "    from . import _hidden\n"
    )
    assert _private_imports(source, "mobilenet.export.pt2") == [
        "1: from mobilenet.export.onnx import _check",
        "2: from mobilenet.memory.ops import _Ledger",
        "6: from mobilenet.export import _hidden",
    ]


def test_no_module_imports_another_modules_private_name():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line in _private_imports(
            path.read_text(), _module_name(path), path.name == "__init__.py"
        )
    ]
    assert not found, (
        "private names imported from another module (give them a public name):\n" + "\n".join(found)
    )
