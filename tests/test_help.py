"""Help that matches: what ``mobilenet --help`` and each command's ``--help`` name is what
the registries hold (formats, engines, tasks), and a new format or engine shows up there
without a help text being edited."""

import re

import pytest

from mobilenet.cli import main
from mobilenet.cli.tasks import TaskCommands, tasks
from mobilenet.formats import Engine, Format, engines, formats

# How a top-level summary names a task's models (a new task needs its word here).
TASK_WORDS = {
    "classification": "classif",
    "detection": "detect",
    "segmentation": "segment",
    "encoder": "encoder",
}


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    """One line per summary and no name broken at a hyphen: a wide terminal."""
    monkeypatch.setenv("COLUMNS", "1000")


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _summaries(capsys) -> dict[str, str]:
    """Each command's one-line summary in ``mobilenet --help``."""
    found, name = {}, None
    for line in _help(capsys).splitlines():
        if m := re.fullmatch(r" {4}(\S+)(?: {2,}(.*))?", line):
            name = m[1]
            if m[2]:
                found[name] = m[2]
        elif name and name not in found and (m := re.fullmatch(r" {6,}(\S.*)", line)):
            found[name] = m[1]
    return found


def _names(text: str, name: str) -> bool:
    """Whether ``text`` names ``name`` as a word (``onnx`` is not in ``onnxruntime``,
    ``torch`` not in ``torch.export`` nor ``PyTorch``)."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)", text) is not None


def _run(lines: list[str]) -> int:
    """How many of ``lines`` continue the option above them (indented past its flag)."""
    count = 0
    while count < len(lines) and lines[count].startswith(" " * 8):
        count += 1
    return count


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_name_finder_tells_words_apart():
    assert _names("onnx (.onnx), torch (.safetensors)", "onnx")
    assert _names("torch (.safetensors)", "torch")
    assert _names("eager, eager-fused", "eager")
    assert not _names("onnxruntime, torch.export, PyTorch", "onnx")
    assert not _names("torch.export, PyTorch, openvino-int8", "torch")
    assert not _names("eager-fused", "eager")
    assert _names("openvino-int8, openvino-bf16.", "openvino-bf16")


def test_the_top_level_summaries_name_what_each_command_does(capsys):
    summary = _summaries(capsys)
    for name, fmt in formats().items():
        assert _names(summary["export"], name) == fmt.exports, (name, summary["export"])
        assert _names(summary["quantize"], name) == fmt.quantizes, (name, summary["quantize"])
        if fmt.quantizes:
            assert fmt.suffix in summary["quantize"], name
    assert set(TASK_WORDS) == set(tasks()), "name the new task's models in TASK_WORDS"
    for command, method in (("train", "train"), ("eval", "evaluate"), ("predict", "predict")):
        for task, commands in tasks().items():
            does = getattr(type(commands), method) is not getattr(TaskCommands, method)
            named = TASK_WORDS[task] in summary[command].lower()
            assert named == does, (command, task, summary[command])


def test_export_help_names_every_format_it_writes_and_their_tasks(capsys):
    text = _flat(_help(capsys, "export"))
    for name, fmt in formats().items():
        assert _names(text, name) == fmt.exports or name == "pytorch", name
        if fmt.exports and fmt.names_files:
            assert fmt.suffix in text, name
    for task in tasks():
        takes = [n for n, f in formats().items() if f.exports and task in f.tasks]
        if takes:
            assert f"{task} to {takes[0]}" in text, task
    lines = _help(capsys, "export").splitlines()
    for option in ("opset", "max_batch"):
        flag = "--" + option.replace("_", "-")
        (at,) = [i for i, x in enumerate(lines) if x.startswith(f"  {flag} ")]
        line = " ".join(lines[at : at + 1 + _run(lines[at + 1 :])])  # with its help
        for name, fmt in formats().items():
            assert (option in fmt.options) <= _names(line, name), (option, name)


def test_quantize_help_names_every_format_it_writes(capsys):
    text = _flat(_help(capsys, "quantize"))
    for name, fmt in formats().items():
        if fmt.quantizes:
            assert _names(text, name) and fmt.suffix in text, name


def test_bench_help_names_every_engine(capsys):
    text = _flat(_help(capsys, "bench"))
    for name, engine in engines().items():
        assert _names(text, name), name
        assert engine.format is None or _names(text, engine.format), name


def test_predict_help_names_every_engine_it_runs(capsys):
    text = _flat(_help(capsys, "predict"))
    for name, engine in engines().items():
        assert _names(text, name) == engine.predicts, name
    assert "auto" in text


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_and_predict_help_name_every_file_they_read(capsys, command):
    text = _flat(_help(capsys, command))
    for name, fmt in formats().items():
        if fmt.loads:
            assert f"{name} ({fmt.suffix})" in text, (command, name)
        else:
            assert not _names(text, name), (command, name)


class _NewFormat(Format):
    """A format added to the registry: every help text names it without an edit."""

    name = "newfmt"
    suffix = ".newfmt"
    summary = "a format added later"
    quantizes = True

    def export(self, model, path, resolution, card, **options):
        raise AssertionError("not run")

    def quantize(self, trained, request):
        raise AssertionError("not run")

    def engines(self):
        return (Engine("newfmt-runtime", build=lambda setup: None, format=self.name),)


def test_a_new_format_and_engine_show_up_in_the_help(capsys, monkeypatch):
    import mobilenet.classification.predict as predict
    import mobilenet.cli.deploy as deploy
    import mobilenet.cli.quantize as quantize
    import mobilenet.cli.train as train
    import mobilenet.formats as registry

    new = _NewFormat()
    more = {**formats(), new.name: new}
    more_engines = {**engines(), "newfmt-runtime": new.engines()[0]}
    for module in (deploy, quantize, train, registry):
        monkeypatch.setattr(module, "formats", lambda: more)
    for module in (registry, predict):
        monkeypatch.setattr(module, "engines", lambda: more_engines)
    summary = _summaries(capsys)
    assert _names(summary["export"], "newfmt") and _names(summary["quantize"], "newfmt")
    assert _names(_flat(_help(capsys, "export")), "newfmt")
    assert _names(_flat(_help(capsys, "bench")), "newfmt-runtime")
    assert "newfmt (.newfmt)" in _flat(_help(capsys, "eval"))
