"""The formats and engines are plugins: nothing outside ``mobilenet.formats`` branches
on a file suffix, a format's name or an engine's name (checked by AST)."""

import ast
from pathlib import Path

from mobilenet.formats import engines, format_of, formats

SRC = Path(__file__).resolve().parent.parent / "src" / "mobilenet"


def _names() -> set[str]:
    """Every suffix, format name and engine name the registries hold."""
    found = set(engines())
    for fmt in formats().values():
        found |= {fmt.name, fmt.suffix}
    return found - {""}


def _branches(tree: ast.AST):
    """The comparisons that decide an ``if``, ``elif``, conditional expression, ``while``
    or comprehension filter, and every ``match`` pattern's constant."""
    for node in ast.walk(tree):
        tests = []
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = list(node.ifs)
        for test in tests:
            yield from (c for c in ast.walk(test) if isinstance(c, ast.Compare))


def test_no_branch_on_a_format_or_engine_outside_the_registry():
    names = _names()
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "formats" in path.relative_to(SRC).parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for compare in _branches(tree):
            for side in (compare.left, *compare.comparators):
                for const in ast.walk(side):
                    if isinstance(const, ast.Constant) and const.value in names:
                        where = f"{path.relative_to(SRC)}:{compare.lineno}"
                        found.append(f"{where}: {ast.unparse(compare)}")
    assert found == []


def test_every_engine_belongs_to_a_known_format_and_names_its_runtime():
    for name, engine in engines().items():
        assert engine.format is None or engine.format in formats(), name
        assert engine.precision in ("float32", "int8", "bf16"), name
        assert not (engine.predicts and engine.precision != "float32"), name  # int8: own files
        assert not (engine.modules and engine.extra is None) or engine.modules == (
            "torchvision",
        ), name


def test_a_file_is_read_by_the_format_of_its_suffix_only():
    named = [f for f in formats().values() if f.names_files]
    suffixes = [f.suffix for f in named]
    assert len(suffixes) == len(set(suffixes))  # one format per suffix
    for fmt in named:
        if fmt.loads:
            assert format_of(Path(f"model{fmt.suffix}")) is fmt
    assert format_of(Path("best.safetensors")) is None  # weights, read by the tasks
    int8 = format_of(Path("int8.safetensors"), {"format": "mobilenet-int8"})
    assert int8 is not None and int8.name == "torch"


def test_no_branch_on_a_task_name_outside_the_task_registry():
    """A task's behaviour is its own package's and its commands' (``mobilenet.cli.tasks``
    finds them by name): nothing else compares a task's name to decide what runs."""
    from mobilenet.card import TASKS

    allowed = ("cli/tasks.py", *(f"{task}/" for task in TASKS))
    found = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        if where.startswith(allowed):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for compare in _branches(tree):
            for side in (compare.left, *compare.comparators):
                items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(i, ast.Constant) and i.value in TASKS for i in items):
                    found.append(f"{where}:{compare.lineno}: {ast.unparse(compare)}")
        for node in ast.walk(tree):
            if isinstance(node, ast.MatchValue) and getattr(node.value, "value", None) in TASKS:
                found.append(f"{where}:{node.lineno}: case {ast.unparse(node.value)}")
    assert found == []
