"""Export to a ``torch.export`` program (``.pt2``), and loading one without running its contents.

``torch.export`` succeeds TorchScript (``torch.jit.load`` warns that it is deprecated). The
program is serialised into memory with the model's config, classes and resolution beside it
(``extra/mobilenet.json``), loaded back through the same checks ``eval`` uses, compared with
PyTorch, and only then written by :func:`~mobilenet.fileio.write_bytes`.

Loading is not safe by itself: ``torch.export.load`` (torch 2.14) unpickles weights and
constants marked ``use_pickle``, falls back to ``weights_only=False`` for sample inputs that
fail the safe loader, loads AOTInductor shared libraries, resolves any ``torch.*`` callable
named as a graph node's target, passes shape expressions to ``sympy.sympify`` (``eval``) and
``exec``\\ s the program's guard code. So before ``torch.export.load`` sees a file,
:func:`read_pt2` checks that it holds only what our export writes: plain tensors, ATen
operators, shape expressions of symbols and integers, and no control characters that would
end a line in generated Python code; guards are not run (the input size is checked here).
Anything else is refused in one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MobileNetError
from ..fileio import read_bytes, write_bytes
from .onnx import _check, _model_metadata
from .prepare import prepare_for_inference

__all__ = ["META_FILE", "export_pt2", "read_pt2"]

META_FILE = "mobilenet.json"  # stored as extra/mobilenet.json in the archive
FORMAT = "mobilenet-pt2"

# Every record our export writes (names as torch's archive reader lists them); any other
# record (AOTInductor libraries, legacy pickled weights, custom objects ...) is refused.
_RECORDS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|extra/" + re.escape(META_FILE)
)
_REQUIRED = (
    "models/model.json",
    "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
)
_TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+|_operator\.getitem")
# Shape expressions: sympy names of the deserializer, symbol names, integers, operators.
_EXPR_TOKEN = re.compile(r"\s+|\d+|'[a-z]+\d+'|[A-Za-z_]\w*|\*\*|//|[-+*/%(),=<>]")
_EXPR_NAMES = frozenset(
    {
        "Symbol", "Integer", "positive", "integer", "True", "False", "FloorDiv", "CeilDiv",
        "CleanDiv", "Mod", "PythonMod", "Max", "Min", "Eq", "Ne",
    }
)  # fmt: skip
_EXPR_SYMBOL = re.compile(r"[a-z]\d+")
# Characters Python's tokenizer takes as a line end (besides \n) and other controls.
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


def export_pt2(
    model: nn.Module,
    path: str | Path,
    resolution: int = 224,
    metadata: dict[str, str] | None = None,
) -> float:
    """Write ``model`` as a ``torch.export`` program with a dynamic batch dimension; returns
    the max abs difference between the reloaded program and PyTorch, checked before the
    file appears. The file keeps the config, resolution and ``metadata`` (class names)."""
    path = Path(path)
    model = model.eval()
    prepared = prepare_for_inference(model, channels_last=False)
    example = torch.randn(2, 3, resolution, resolution)  # batch 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.export.export(prepared, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch raises many types for a model it cannot trace
        raise MobileNetError(f"torch.export cannot export {name}: {_first_line(e)}") from None
    meta = {**_model_metadata(model, resolution), **(metadata or {}), "format": FORMAT}
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta)})
    data = buffer.getvalue()
    loaded, _ = read_pt2(data, "the exported program")  # what eval will load, checked
    diff = _check(lambda t: loaded(t).detach().numpy(), model, resolution, "torch.export")
    write_bytes(path, data)
    return diff


def read_pt2(source: str | Path | bytes, name: str = "") -> tuple[nn.Module, dict[str, str]]:
    """The program of a ``.pt2`` written by :func:`export_pt2` (a callable module, guards
    not run) and its metadata; anything else, or a damaged file, is one error."""
    what = name or str(source)
    data = read_bytes(source, what)
    metadata = _inspect(data, what)
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
            module = program.module(check_guards=False)  # guards are code from the file
    except Exception as e:  # torch raises many types for a damaged program
        message = f"{what}: not a program torch.export can load ({_first_line(e)})"
        raise MobileNetError(message) from None
    return module, metadata


def _inspect(data: bytes, what: str) -> dict[str, str]:
    """Refuse a file that is not an archive of our export, or that holds anything that
    ``torch.export.load`` would unpickle, ``eval`` or ``exec``; returns our metadata."""
    from torch.export.pt2_archive import PT2ArchiveReader

    try:
        if "version" in zipfile.ZipFile(io.BytesIO(data)).namelist():
            # The pre-2.8 layout, whose loader falls back to unpickling.
            raise MobileNetError(f"{what}: an old torch.export archive; export it again")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PT2ArchiveReader(io.BytesIO(data))
            records = set(reader.get_file_names())
    except MobileNetError:
        raise
    except Exception as e:  # zipfile.BadZipFile, RuntimeError, AssertionError ...
        raise MobileNetError(f"{what}: not a .pt2 archive ({_first_line(e)})") from None
    if f"extra/{META_FILE}" not in records:
        raise MobileNetError(f"{what}: not a .pt2 file written by mobilenet export")
    unknown = sorted(r for r in records if not _RECORDS.fullmatch(r))
    missing = [r for r in _REQUIRED if r not in records]
    if unknown or missing:
        raise MobileNetError(
            f"{what}: holds {unknown[0]!r}" if unknown else f"{what}: lacks {missing[0]!r}"
        ) from None
    try:
        metadata = json.loads(reader.read_bytes(f"extra/{META_FILE}"))
        for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
            config = json.loads(reader.read_bytes(f"data/{kind}/model_{kind}_config.json"))
            for entry in config["config"].values():
                if entry["use_pickle"] or not re.fullmatch(rf"{prefix}\d+", entry["path_name"]):
                    raise MobileNetError(f"{what}: holds pickled {kind}; only tensors load")
        sample = reader.read_bytes("data/sample_inputs/model.pt")
        graph = json.loads(reader.read_bytes("models/model.json"))
    except MobileNetError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise MobileNetError(f"{what}: damaged .pt2 archive ({_first_line(e)})") from None
    if sample:
        try:  # else torch retries with weights_only=False
            torch.load(io.BytesIO(sample), weights_only=True)
        except Exception as e:  # torch raises many types for a bad or unsafe pickle
            raise MobileNetError(f"{what}: sample inputs are not plain tensors ({e})") from None
    _check_graph(graph, what)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise MobileNetError(f"{what}: not a .pt2 file written by mobilenet export")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise MobileNetError(f"{what}: its mobilenet metadata is damaged")
    return metadata


def _check_graph(graph: Any, what: str) -> None:
    """Only ATen operators as node targets, only symbols and integers in shape
    expressions, no line-ending control characters in any string."""

    def walk(value: Any, key: str | None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k, None)
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str):
            if _BAD_CHARS.search(value):
                raise MobileNetError(f"{what}: control characters in its program")
            if key == "target" and not _TARGET.fullmatch(value):
                raise MobileNetError(f"{what}: calls {value[:80]!r}; only ATen operators load")
            if key == "expr_str" and not _safe_expression(value):
                raise MobileNetError(f"{what}: unexpected shape expression {value[:80]!r}")

    walk(graph, None)


def _safe_expression(text: str) -> bool:
    """Whether ``text`` tokenises into known names, symbol names, integers and operators
    (no attribute access, no other names: sympify evaluates it as Python)."""
    pos = 0
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        if match is None:
            return False
        token = match.group()
        name = token[0].isalpha() or token[0] == "_"
        if name and token not in _EXPR_NAMES and not _EXPR_SYMBOL.fullmatch(token):
            return False
        pos = match.end()
    return True


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Keep torch.export's logged warnings (with tracebacks) off stderr: a refusal is
    one line."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch._dynamo")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:  # their children log at the level they inherit
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
