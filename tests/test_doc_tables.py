"""The documentation's tables of measured figures: every placeholder in the pages names a
record in benchmarks/ that renders, and an unknown one stops the build (docs/hooks.py)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()
PAGES = sorted(DOCS.rglob("*.md"))
USED = sorted(
    {(p.relative_to(ROOT).as_posix(), n) for p in PAGES for n in hooks.placeholders(p.read_text())}
)
MACHINE = re.compile(r"^\*Measured on .+; .+; \d{4}-\d{2}-\d{2} \(.+\); `benchmarks/[\w.-]+\.json`")


def test_pages_use_placeholders():
    assert len(USED) >= 20


@pytest.mark.parametrize(("page", "name"), USED, ids=[f"{p}:{n}" for p, n in USED])
def test_placeholder_renders(page, name):
    text = hooks.render(name)
    table, _, machine = text.rpartition("\n\n")
    lines = table.splitlines()
    assert lines[0].startswith("| ") and set(lines[1]) <= set("|- ")
    assert len(lines) >= 3, f"{page}: {name} renders an empty table"
    assert MACHINE.match(machine), machine


@pytest.mark.parametrize(
    "name",
    [
        "engine_grid_batch1",
        "engine_grid_batch32",
        "inference_bench",
        "int8_mnist",
        "memory_efficient",
        "v4_bench",
        "runtime_recipes",
        "litert_int8",
        "pte_int8_accuracy",
        "pte_integer_only",
        "load_checks",
        "hostile_files",
        "data_startup",
    ],
)
def test_records_of_the_former_readme_tables_are_used(name):
    assert name in {n.partition(":")[0] for _, n in USED}


def test_every_record_renders():
    for name in hooks.record_names():
        assert hooks.render(name).count("\n| ") >= 2, name


def test_machine_line_names_cpu_isa_load_and_date():
    line = hooks.render("engine_grid_batch1").rpartition("\n\n")[2]
    assert "AVX-512" in line and "cores busy" in line
    assert "last commit" in line or "modification time" in line


def test_unknown_placeholder_fails_the_build():
    with pytest.raises(Exception, match=r"no record benchmarks/no_such_record\.json"):
        hooks.on_page_markdown("text\n<!-- table: no_such_record -->\n", page=None)


def test_placeholder_is_replaced():
    out = hooks.on_page_markdown("before\n\n<!-- table: int8_mnist -->\n\nafter", page=None)
    assert "<!--" not in out and "| mobilenet_v2 |" in out and out.endswith("after")
