"""The examples of README.md and docs/**/*.md are tests too (see tests/doc_examples.py):
each fenced console or python block is one item, ``README.md::line:12,column:1``."""

from pathlib import Path

import pytest
from tests.doc_examples import mark_slow, page_scheduler, page_sybils

pytest_collect_file = page_sybils(Path(__file__).parent).pytest()


def pytest_itemcollected(item: pytest.Item) -> None:
    mark_slow(item)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    return page_scheduler(config, log)
