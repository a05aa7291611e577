"""The examples of README.md and of the documentation pages (docs/**/*.md), run as tests.

Sybil finds the fenced blocks; each block is one pytest item named after its page and
line (``README.md::line:12,column:1``). The rules are those of the documentation
conventions:

- A ```console block holds shell commands (lines starting with ``$ ``, continued on the
  next line by a trailing backslash), each followed by its expected output. They run with
  bash in a working folder of their page (a fresh temporary folder per page, shared by the
  page's blocks in page order), with :func:`command_environment`, stdout and stderr merged.
- Output matches line by line (:func:`output_matches`): trailing whitespace is ignored, a
  line that is just ``...`` matches any number of lines, ``...`` inside a line any text
  within that line.
- A command exits 0, unless its expected output ends with a ``mobilenet ...: error: ...``
  line: then it exits non-zero (:func:`expects_error`).
- A ```python block runs in one namespace per page, in the page's working folder;
  doctest-style ``>>>`` blocks compare with ELLIPSIS and NORMALIZE_WHITESPACE.
- ``<!-- slow -->`` on the line right before a block marks its items ``slow`` (:func:`is_slow`).
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sybil import Document, Example, Region, Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser

PROMPT = "$ "
WILDCARD = "..."
SLOW_MARK = "<!-- slow -->"
DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# The key of a page's working folder in its Sybil namespace (a dunder: no example's name).
FOLDER_KEY = "__page_folder__"
# A command that runs longer than this fails (and its process group is killed).
COMMAND_TIMEOUT_S = 1800
FENCES = ("```", "~~~")


@dataclass(frozen=True)
class Command:
    """One ``$ `` command of a console block and the output written under it."""

    source: str  # as bash reads it: continuation lines kept, with their backslashes
    expected: tuple[str, ...]
    line: int  # the line of its ``$ `` in the page


def parse_console(source: str, first_line: int) -> list[Command]:
    """The commands of a console block whose first line is line ``first_line`` of its page.

    Raises ValueError for text before the first command (output of no command)."""
    commands: list[Command] = []
    lines = source.removesuffix("\n").split("\n")
    i = 0
    while i < len(lines):
        if not lines[i].startswith(PROMPT):
            if lines[i].strip():
                raise ValueError(
                    f"line {first_line + i}: output before any `$ ` command: {lines[i]!r}"
                )
            i += 1
            continue
        start = i
        command = [lines[i][len(PROMPT) :]]
        while command[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i])
        i += 1
        expected_start = i
        while i < len(lines) and not lines[i].startswith(PROMPT):
            i += 1
        expected = tuple(lines[expected_start:i])
        commands.append(Command("\n".join(command), expected, first_line + start))
    return commands


def terminal_lines(text: str) -> list[str]:
    """``text`` as lines compared: trailing whitespace and trailing blank lines dropped, and
    a line a carriage return rewrote shown as a terminal leaves it (its last part)."""
    lines = []
    for line in text.split("\n"):
        parts = [part for part in line.split("\r") if part]
        lines.append((parts[-1] if parts else "").rstrip())
    while lines and not lines[-1]:
        lines.pop()
    return lines


def line_matches(expected: str, actual: str) -> bool:
    """One expected line against one actual line; ``...`` inside it matches any text."""
    if WILDCARD not in expected:
        return expected == actual
    pattern = ".*".join(re.escape(part) for part in expected.split(WILDCARD))
    return re.fullmatch(pattern, actual) is not None


def output_matches(expected: Iterable[str], actual: Iterable[str]) -> bool:
    """Expected lines against actual ones (both through :func:`terminal_lines` rules);
    a line that is just ``...`` matches zero or more lines."""
    want = terminal_lines("\n".join(expected))
    got = terminal_lines("\n".join(actual))
    # reachable[j]: the first i lines of `want` can match the first j lines of `got`.
    reachable = [True] + [False] * len(got)
    for line in want:
        if line.strip() == WILDCARD:
            for j in range(1, len(got) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [
                reachable[j - 1] and line_matches(line, got[j - 1]) for j in range(1, len(got) + 1)
            ]
    return reachable[-1]


def expects_error(expected: Iterable[str]) -> bool:
    """Whether the expected output ends with the CLI's one-line error (the command must
    then exit non-zero)."""
    lines = terminal_lines("\n".join(expected))
    return bool(lines) and lines[-1].startswith("mobilenet ") and "error:" in lines[-1]


def command_environment(folder: Path) -> dict[str, str]:
    """The environment of a page's commands: one thread, no warnings, 80 columns, a
    cache in the page's folder, and this environment's ``mobilenet`` and ``python`` first
    on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        COLUMNS="80",
        MOBILENET_HOME=str(folder / ".home"),
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
    )
    return env


def run_command(source: str, folder: Path, timeout: float = COMMAND_TIMEOUT_S) -> tuple[str, int]:
    """Run ``source`` with bash in ``folder``: its stdout and stderr merged, and its exit
    status (a command still running after ``timeout`` seconds is killed: status -9)."""
    process = subprocess.Popen(
        ["bash", "-c", source],
        cwd=folder,
        env=command_environment(folder),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n[killed after {timeout:.0f} s]"
    return output, process.returncode


def indented(lines: Iterable[str]) -> str:
    return "\n".join("    " + line for line in lines) or "    (nothing)"


def check_command(command: Command, output: str, status: int) -> str | None:
    """None when ``command`` did as its page says, else a message showing the command, its
    expected and its actual output."""
    must_fail = expects_error(command.expected)
    status_ok = status != 0 if must_fail else status == 0
    output_ok = output_matches(command.expected, output.split("\n"))
    if status_ok and output_ok:
        return None
    problems = [] if output_ok else ["the output differs"]
    if not status_ok:
        wanted = (
            "non-zero (the output ends with a `mobilenet ...: error:` line)" if must_fail else "0"
        )
        problems.append(f"exit status {status}, expected {wanted}")
    return "\n".join(
        [
            f"line {command.line}: {'; '.join(problems)}",
            "command:",
            indented((PROMPT + command.source).splitlines()),
            "expected output:",
            indented(command.expected),
            "actual output:",
            indented(terminal_lines(output)),
        ]
    )


def page_folder(namespace: dict[str, Any]) -> Path:
    """The working folder of a page, made on first use."""
    if FOLDER_KEY not in namespace:
        namespace[FOLDER_KEY] = Path(tempfile.mkdtemp(prefix="mobilenet-docs-"))
    return namespace[FOLDER_KEY]


def remove_page_folder(namespace: dict[str, Any]) -> None:
    """Sybil's teardown of a page: its working folder goes."""
    folder = namespace.pop(FOLDER_KEY, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def evaluate_console(example: Example) -> str | None:
    """Sybil's evaluator of a console block: its commands in turn, up to the first that
    fails (its message), else None."""
    try:
        commands = parse_console(example.parsed, example.line + 1)
    except ValueError as error:
        return str(error)
    folder = page_folder(example.namespace)
    for command in commands:
        output, status = run_command(command.source, folder)
        failure = check_command(command, output, status)
        if failure is not None:
            return failure
    return None


def in_page_folder(evaluator: Callable[[Example], Any]) -> Callable[[Example], Any]:
    """``evaluator`` run with the page's working folder as the current one and its cache
    as MOBILENET_HOME (so Python examples see the files the page's commands wrote)."""

    def evaluate(example: Example) -> Any:
        __tracebackhide__ = True
        folder = page_folder(example.namespace)
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(folder)
            patch.setenv("MOBILENET_HOME", str(folder / ".home"))
            return evaluator(example)

    return evaluate


class PythonInPageFolder(PythonCodeBlockParser):
    """Sybil's parser of ```python blocks (doctest ones compared with :data:`DOCTEST_FLAGS`),
    its examples run in the page's working folder."""

    def __init__(self) -> None:
        super().__init__(doctest_optionflags=DOCTEST_FLAGS)

    def __call__(self, document: Document) -> Iterable[Region]:
        for region in super().__call__(document):
            region.evaluator = in_page_folder(region.evaluator)
            yield region


def is_slow(text: str, position: int) -> bool:
    """Whether the fenced block holding ``position`` of ``text`` has ``<!-- slow -->`` on
    the line right before its opening fence."""
    end = text.find("\n", position)
    lines = text[: len(text) if end < 0 else end].split("\n")
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].lstrip().startswith(FENCES):
            return index > 0 and lines[index - 1].strip() == SLOW_MARK
    return False


def mark_slow(item: pytest.Item) -> None:
    """Give a page's item the ``slow`` marker when its block is marked slow."""
    example = getattr(item, "example", None)
    if isinstance(example, Example) and is_slow(example.document.text, example.start):
        item.add_marker(pytest.mark.slow)


def parsers() -> list[Callable[[Document], Iterable[Region]]]:
    return [CodeBlockParser("console", evaluate_console), PythonInPageFolder()]


def page_sybils(root: Path) -> Any:
    """The Sybil configuration of the pages under ``root``: ``root/README.md`` and every
    ``.md`` file under ``root/docs``. Use its ``.pytest()`` as ``pytest_collect_file``."""
    root = Path(root).absolute()
    readme = Sybil(
        parsers(),
        path=str(root),
        patterns=["README.md"],
        excludes=["*/README.md"],  # README.md of the root only, not of test fixtures
        teardown=remove_page_folder,
    )
    docs = Sybil(parsers(), path=str(root / "docs"), patterns=["*.md"], teardown=remove_page_folder)
    return readme + docs


def page_of(nodeid: str) -> str:
    """The scope a test id is scheduled in: its page for a page's example (its blocks share
    a working folder, so they run on one process, in order), else the test itself."""
    path = nodeid.split("::", 1)[0]
    return path if path.endswith(".md") else nodeid


def page_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's scheduler for ``-n N`` (dist "load"): tests spread as by "load", but
    the examples of a page stay together; None (xdist's own) for any other --dist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class PageScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return page_of(nodeid)

    return PageScheduling(config, log)
