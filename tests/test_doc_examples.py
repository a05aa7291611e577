"""The runner of the pages' examples (tests/doc_examples.py, conftest.py): its parts on
their own, then the project's conftest.py collecting and running small generated pages."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_examples import (
    Command,
    check_command,
    expects_error,
    is_slow,
    output_matches,
    page_of,
    parse_console,
    run_command,
    terminal_lines,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist"]


def test_a_console_block_parses_into_commands_and_their_output():
    source = "$ echo a \\\n    b\na b\n\n$ true\n$ printf 'x\\n'\nx\n"
    assert parse_console(source, 10) == [
        Command("echo a \\\n    b", ("a b", ""), 10),
        Command("true", (), 14),
        Command("printf 'x\\n'", ("x",), 15),
    ]
    with pytest.raises(ValueError, match="line 3: output before any"):
        parse_console("stray\n$ true\n", 3)


def test_output_matching():
    assert output_matches(["a", "b"], ["a", "b  ", "", ""])  # trailing whitespace, blank lines
    assert not output_matches(["a", "b"], ["a", "c"])
    assert not output_matches(["a"], ["a", "b"])
    assert not output_matches([" a"], ["a"])  # leading whitespace counts
    # a line that is just "..." matches zero or more lines
    assert output_matches(["a", "...", "z"], ["a", "z"])
    assert output_matches(["a", "...", "z"], ["a", "b", "c", "z"])
    assert output_matches(["...", "z"], ["a", "z"])
    assert output_matches(["a", "  ..."], ["a", "b", "c"])
    assert not output_matches(["a", "...", "z"], ["a", "b"])
    # "..." inside a line matches any text within that line, not across lines
    assert output_matches(["epoch 1  loss ...  img/s ..."], ["epoch 1  loss 0.25  img/s 208"])
    assert output_matches(["done in ... s"], ["done in  s"])
    assert not output_matches(["done in ... s"], ["done in 3 s", "more"])
    assert not output_matches(["top-1 9...%"], ["top-1 88.2%"])
    assert output_matches(["a.b (c)"], ["a.b (c)"])  # no other pattern characters
    assert not output_matches(["a.b"], ["axb"])


def test_a_carriage_return_shows_as_a_terminal_leaves_the_line():
    assert terminal_lines("10%\r100%\ndone  \n\n") == ["100%", "done"]


def test_an_error_line_expects_a_failure():
    assert expects_error(["mobilenet cost: error: unknown model 'x'"])
    assert expects_error(["usage: ...", "mobilenet convert: error: ...", ""])
    assert not expects_error(["mobilenet cost: error: x", "more"])
    assert not expects_error(["error: x"])
    assert not expects_error([])


def test_a_failure_shows_the_command_and_both_outputs():
    command = Command("mobilenet cost x", ("expected line",), 7)
    assert check_command(command, "expected line\n", 0) is None
    message = check_command(command, "actual line\n", 0)
    assert message is not None
    assert message.startswith("line 7: the output differs")
    for text in ("    $ mobilenet cost x", "    expected line", "    actual line"):
        assert text in message
    message = check_command(command, "expected line\n", 2)
    assert message is not None and "exit status 2, expected 0" in message
    error = Command("mobilenet cost x", ("mobilenet cost: error: ...",), 9)
    assert check_command(error, "mobilenet cost: error: no\n", 2) is None
    message = check_command(error, "mobilenet cost: error: no\n", 0)
    assert message is not None and "exit status 0, expected non-zero" in message


def test_a_command_past_its_time_is_killed(tmp_path):
    output, status = run_command("echo started; sleep 30", tmp_path, timeout=0.5)
    assert status != 0 and output.startswith("started") and "killed after" in output


def test_the_slow_mark_covers_the_block_right_after_it():
    text = "<!-- slow -->\n```console\n$ a\n```\n\n```console\n$ b\n```\n"
    assert is_slow(text, 0 + len("<!-- slow -->\n"))  # the opening fence
    assert is_slow(text, text.index("$ a"))  # inside the block
    assert not is_slow(text, text.index("```console\n$ b"))
    assert not is_slow("<!-- slow -->\n\n```python\n>>> 1\n```\n", 16)  # not right before


def test_a_pages_examples_are_scheduled_together():
    assert page_of("docs/training.md::line:12,column:1") == "docs/training.md"
    assert page_of("tests/test_cost.py::test_x[a::b]") == "tests/test_cost.py::test_x[a::b]"


class Page:
    """A page under construction that knows the line each example starts on."""

    def __init__(self) -> None:
        self.text = "# A page\n"
        self.outcomes: dict[int, str] = {}

    def block(self, language: str, body: str, outcome: str, slow: bool = False) -> int:
        self.text += "\n" + ("<!-- slow -->\n" if slow else "")
        line = self.text.count("\n") + 1
        self.text += f"```{language}\n{body}```\n"
        if outcome:
            self.outcomes[line] = outcome
        return line

    def doctest(self, body: str, outcomes: list[str]) -> None:
        line = self.block("python", body, "")
        prompts = [i for i, text in enumerate(body.splitlines()) if text.startswith(">>>")]
        for index, outcome in zip(prompts, outcomes, strict=True):
            self.outcomes[line + 1 + index] = outcome


def readme_page() -> Page:
    page = Page()
    page.block("console", "$ echo hello\nhello\n", "PASSED")
    page.block("console", "$ echo hello\ngoodbye\n", "FAILED")  # the output changed
    page.block("console", "$ echo goodbye\nhello\n", "FAILED")  # the command changed
    page.block("console", "$ no-such-command\n", "FAILED")
    page.block("console", "$ printf 'a\\nb\\nc\\nimg/s 123.4  \\n'\na\n...\nimg/s ...\n", "PASSED")
    page.block("console", "$ printf 'one\\n'\n...\none\n...\n", "PASSED")
    error = "$ printf 'mobilenet cost: error: no model x\\n'"
    page.block("console", f"{error}; exit 2\nmobilenet cost: error: no model ...\n", "PASSED")
    page.block("console", f"{error}\nmobilenet cost: error: no model x\n", "FAILED")
    page.block("console", "$ echo first; exit 3\nfirst\n", "FAILED")
    page.block("console", "$ echo slow\nslow\n", "deselected", slow=True)
    environment = (
        '$ echo "$OMP_NUM_THREADS $PYTHONWARNINGS $COLUMNS"\n1 ignore 80\n'
        '$ [ "$(cd "$(dirname "$MOBILENET_HOME")" && pwd -P)" = "$(pwd -P)" ] && echo in folder\n'
        "in folder\n"
        "$ command -v mobilenet python\n"
        f"{BIN}/mobilenet\n{BIN}/python\n"
        "$ echo kept > shared.txt\n$ echo one \\\n    two\none two\n"
    )
    page.block("console", environment, "PASSED")
    code = ">>> from pathlib import Path\n>>> Path('shared.txt').read_text()\n'kept\\n'\n"
    code += ">>> 1 + 1\n3\n>>> list(range(30))\n[0, 1,\n ..., 29]\n"
    page.doctest(code, ["PASSED", "PASSED", "FAILED", "PASSED"])
    page.block("python", "answer = 41\n", "PASSED")
    page.doctest(">>> answer + 1\n42\n", ["PASSED"])
    return page


@pytest.fixture(scope="module")
def generated_pages(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """README.md and two docs pages in a folder, run by the project's conftest.py in a
    child pytest with the slow examples deselected; the outcome each id should have."""
    root = tmp_path_factory.mktemp("pages")
    shutil.copy(ROOT / "conftest.py", root / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    readme = readme_page()
    (root / "README.md").write_text(readme.text)
    (root / "docs" / "sub").mkdir(parents=True)
    other = Page()
    other.block("console", "$ test -e shared.txt || echo absent\nabsent\n", "PASSED")
    (root / "docs" / "sub" / "other.md").write_text(other.text)
    (root / "tests" / "fixtures").mkdir(parents=True)  # a README.md that is not a page
    (root / "tests" / "fixtures" / "README.md").write_text("```console\n$ false\n```\n")
    expected = {f"README.md::line:{n},column:1": s for n, s in readme.outcomes.items()}
    expected.update({f"docs/sub/other.md::line:{n},column:1": s for n, s in other.outcomes.items()})
    result = subprocess.run(
        [*PYTEST, "-rA", "-q", "-m", "not slow", "README.md", "docs", "tests"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, expected


def test_the_pages_examples_pass_and_fail_as_they_should(generated_pages):
    result, expected = generated_pages
    found = dict(
        (name, outcome)
        for outcome, name in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", result.stdout, re.M)
    )
    wanted = {name: outcome for name, outcome in expected.items() if outcome != "deselected"}
    assert found == wanted, result.stdout + result.stderr


def test_a_slow_block_is_deselected_by_not_slow(generated_pages):
    result, expected = generated_pages
    assert list(expected.values()).count("deselected") == 1
    assert re.search(r"\b1 deselected\b", result.stdout), result.stdout
    slow = next(name for name, outcome in expected.items() if outcome == "deselected")
    assert slow not in result.stdout


def test_a_failure_names_the_page_line_and_command(generated_pages):
    result, _ = generated_pages
    assert re.search(r"line \d+: the output differs\ncommand:\n    \$ echo goodbye", result.stdout)
    assert "exit status 0, expected non-zero" in result.stdout
    assert "exit status 3, expected 0" in result.stdout
