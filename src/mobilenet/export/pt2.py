"""Export to a ``torch.export`` program (``.pt2``), and loading one without running its contents.

``torch.export`` succeeds TorchScript (``torch.jit.load`` warns that it is deprecated). The
program is serialised into memory with the model's config, classes and resolution beside it
(``extra/mobilenet.json``), loaded back through the same checks ``eval`` uses, compared with
PyTorch, and only then written by :func:`~mobilenet.fileio.write_bytes`. The metadata keeps a
``digest``: the SHA-256 of every other record of the archive (:func:`records_digest`), so a
changed byte anywhere in the program or its weights is found on load.

Loading is not safe by itself: ``torch.export.load`` (torch 2.14) unpickles weights and
constants marked ``use_pickle``, falls back to ``weights_only=False`` for sample inputs that
fail the safe loader, loads AOTInductor shared libraries, resolves any ``torch.*`` callable
named as a graph node's target, passes shape expressions to ``sympy.sympify`` (``eval``),
writes the graph's names verbatim into the Python code that ``torch.fx`` generates and
``exec``\\ s (placeholder names become parameters of ``forward``, evaluated at load; parameter
paths become ``getattr(self, "...")``), and ``exec``\\ s the program's guard code. So before
``torch.export.load`` sees a file, :func:`read_pt2` checks, in this order:

- the archive: every record stored (not compressed), named once, and matching its CRC-32;
  only the records our export writes;
- its contents: plain tensors (nothing pickled), ATen operators as targets, no guard code,
  no control character that would end a line of generated code; every name that becomes a
  Python identifier (graph inputs, outputs and nodes, the values arguments refer to,
  signature and ``forward`` argument names) a plain ASCII identifier that is no keyword,
  builtin or name of the generated code's own, parameter and buffer paths dotted such
  identifiers (``features.0.weight``), symbols ``s0``-like names; shape expressions parsed by
  a grammar of our own (:func:`_safe_expression`: ``Symbol``, bounded ``Integer`` and a few
  integer functions, as ``torch.export.save`` writes them; no powers, bounded nesting), so
  that ``sympify`` never sees text that computes without end;
- the digest (a mismatch is "damaged"; a file without one loads with a one-line note);
- the metadata against the program's serialised shapes: the resolution against the input,
  the number of classes against the output.

Guards are not run (the input size is checked by the caller). Anything else is refused in
one line.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import keyword
import logging
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ..errors import CheckpointError, MobileNetError
from ..fileio import read_bytes, write_bytes
from ..integrity import DIGEST_KEY
from .onnx import _check, _model_metadata
from .prepare import prepare_for_inference

__all__ = ["META_FILE", "export_pt2", "read_pt2", "records_digest"]

META_FILE = "mobilenet.json"  # stored as extra/mobilenet.json in the archive
FORMAT = "mobilenet-pt2"
_META_RECORD = f"extra/{META_FILE}"

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
# Characters Python's tokenizer takes as a line end (besides \n) and other controls.
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")

# Names torch.fx writes into generated code: not keywords, not builtins, not the globals of
# that code (torch.fx's own rule for the names it makes), not the method's ``self``.
_RESERVED = frozenset(
    {*keyword.kwlist, *dir(builtins), "self", "inf", "nan", "NoneType", "torch", "device",
     "fx_pytree", "pytree"}
)  # fmt: skip
_NAME_MAX = 200  # characters of one name; torch's longest are parameter paths made flat
_PATH_MAX = 1000
_SYMBOL = re.compile(r"[a-z]\d{1,9}")  # s77: torch's names of shape symbols
# Argument kinds that hold no name (constants); tensors and symbols are checked by name, and
# the rest (graphs of higher-order operators, custom objects, operators as values, dicts of
# arguments) our export never writes.
_CONSTANT_ARGUMENTS = frozenset(
    {"as_none", "as_int", "as_ints", "as_float", "as_floats", "as_string", "as_strings",
     "as_scalar_type", "as_memory_format", "as_layout", "as_device", "as_bool", "as_bools",
     "as_complex", "as_int_lists", "as_float_lists"}
)  # fmt: skip
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})

# Shape expressions as torch.export.save writes them (sympy's srepr): calls of these
# functions on symbols and integers, e.g. Symbol('s77', positive=True, integer=True).
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_]\w*)|(?P<int>\d+)|'(?P<str>[^']*)'|(?P<op>[(),=-]))"
)
_EXPR_FUNCTIONS = frozenset(
    {"Add", "Mul", "FloorDiv", "CeilDiv", "CleanDiv", "Mod", "PythonMod", "Max", "Min"}
)
_EXPR_FLAGS = frozenset({"positive", "nonnegative", "integer"})
_EXPR_MAX_LENGTH = 1000
_EXPR_MAX_DEPTH = 16
_EXPR_MAX_INT = 2**31


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
    meta[DIGEST_KEY] = "0" * 64  # the digest's length: filled in without moving a byte
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta)})
    data = _sealed(buffer.getvalue(), meta)
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


def records_digest(records: Mapping[str, bytes]) -> str:
    """The SHA-256 (hex) of an archive's records: sorted by name, each hashed as its name
    and its bytes, both preceded by their lengths (so no two archives hash alike by moving
    bytes from one record to the next). :func:`export_pt2` stores it in the metadata,
    computed over every record but the metadata's own."""
    digest = hashlib.sha256()
    for name in sorted(records):
        for part in (name.encode(), records[name]):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def _sealed(data: bytes, meta: dict[str, str]) -> bytes:
    """The archive ``data`` (``meta`` as its metadata, with a digest of zeros) with the
    digest of its other records in the metadata. The record keeps its length, so every
    offset (and torch's alignment of records) stays; only its CRC-32 changes."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        records = {_record_name(i.filename): archive.read(i) for i in archive.infolist()}
    del records[_META_RECORD]
    sealed = json.dumps({**meta, DIGEST_KEY: records_digest(records)}).encode()
    return _replace_stored_record(data, _META_RECORD, sealed)


def _replace_stored_record(data: bytes, record: str, new: bytes) -> bytes:
    """The zip archive ``data`` with the bytes of its stored ``record`` replaced by ``new``
    (of the same length), and its CRC-32 where zip keeps it: the local header or, when the
    writer streamed (torch does), the data descriptor after the bytes; and the central
    directory."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        directory = archive.start_dir
    info = next(i for i in infos if _record_name(i.filename) == record)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != len(new):
        raise RuntimeError(f"cannot replace {record!r} in place")
    out = bytearray(data)
    crc = struct.pack("<L", zlib.crc32(new))
    header = info.header_offset
    name_length, extra_length = struct.unpack_from("<HH", data, header + 26)
    begin = header + 30 + name_length + extra_length
    out[begin : begin + len(new)] = new
    if info.flag_bits & 0x08:  # a data descriptor follows, its signature optional
        at = begin + len(new)
        at += 4 if data[at : at + 4] == b"PK\x07\x08" else 0
        out[at : at + 4] = crc
    else:
        out[header + 14 : header + 18] = crc
    at = directory
    for i in infos:  # the central directory lists them in this order
        if data[at : at + 4] != b"PK\x01\x02":
            raise RuntimeError("unexpected central directory layout")
        if i is info:
            out[at + 16 : at + 20] = crc
        at += 46 + sum(struct.unpack_from("<HHH", data, at + 28))
    result = bytes(out)
    with zipfile.ZipFile(io.BytesIO(result)) as archive:  # reads back, CRC-32 checked
        if archive.read(info.filename) != new:
            raise RuntimeError(f"replacing {record!r} failed")
    return result


def _record_name(filename: str) -> str:
    """A record's name as torch's archive reader lists it (without the archive's folder)."""
    return filename.split("/", 1)[-1]


def _inspect(data: bytes, what: str) -> dict[str, str]:
    """Refuse a file that is not an archive of our export, that holds anything that
    ``torch.export.load`` would unpickle, ``eval`` or ``exec``, that is damaged, or whose
    metadata contradicts its program; returns our metadata."""
    from torch.export.pt2_archive import PT2ArchiveReader

    names = _check_archive(data, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PT2ArchiveReader(io.BytesIO(data))
            listed = reader.get_file_names()
    except Exception as e:  # RuntimeError, AssertionError ...
        raise MobileNetError(f"{what}: not a .pt2 archive ({_first_line(e)})") from None
    records = set(listed)
    if len(listed) != len(records) or records != names:  # the bytes checked, torch loads
        raise MobileNetError(f"{what}: not a .pt2 archive (its records read two ways)")
    if _META_RECORD not in records:
        raise MobileNetError(f"{what}: not a .pt2 file written by mobilenet export")
    unknown = sorted(r for r in records if not _RECORDS.fullmatch(r))
    missing = [r for r in _REQUIRED if r not in records]
    if unknown or missing:
        raise MobileNetError(
            f"{what}: holds {unknown[0]!r}" if unknown else f"{what}: lacks {missing[0]!r}"
        ) from None
    try:
        contents = {r: reader.read_bytes(r) for r in sorted(records)}  # what torch loads
        metadata = json.loads(contents[_META_RECORD])
        for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
            config = json.loads(contents[f"data/{kind}/model_{kind}_config.json"])
            for path, entry in config["config"].items():
                if entry["use_pickle"] or not re.fullmatch(rf"{prefix}\d+", entry["path_name"]):
                    raise MobileNetError(f"{what}: holds pickled {kind}; only tensors load")
                if not _is_path(path):
                    raise MobileNetError(f"{what}: its program names {kind} {path[:80]!r}")
        graph = json.loads(contents["models/model.json"])
    except MobileNetError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise MobileNetError(f"{what}: damaged .pt2 archive ({_first_line(e)})") from None
    sample = contents["data/sample_inputs/model.pt"]
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
    del contents[_META_RECORD]  # the digest covers every other record
    sealed = _check_digest(metadata, contents, what)
    _check_shapes(metadata, graph, what)
    if not sealed:  # after every refusal: a refused file gets one line, not two
        warnings.warn(
            f"{what} carries no digest (written by an older version, or not by mobilenet): "
            "it cannot be checked for damage",
            stacklevel=3,
        )
    return metadata


def _check_archive(data: bytes, what: str) -> set[str]:
    """The names of the records of a zip archive whose records are stored, named once,
    under one folder, and match their CRC-32 (torch's reader does not check them)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError ...
        raise MobileNetError(f"{what}: not a .pt2 archive ({_first_line(e)})") from None
    if "version" in names:  # the pre-2.8 layout, whose loader falls back to unpickling
        raise MobileNetError(f"{what}: an old torch.export archive; export it again")
    folders = {n.split("/", 1)[0] for n in names}
    if len(folders) > 1 or any("/" not in n for n in names):
        raise MobileNetError(f"{what}: not a .pt2 archive (records outside one folder)")
    seen: set[str] = set()
    for info in archive.infolist():
        name = _record_name(info.filename)
        if name in seen:
            raise MobileNetError(f"{what}: holds {name!r} twice")
        seen.add(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise MobileNetError(f"{what}: holds {name!r} compressed; torch.export stores them")
        try:
            with archive.open(info) as record:  # read to the end: zipfile checks the CRC-32
                while record.read(1 << 20):
                    pass
        except Exception as e:  # zipfile.BadZipFile (CRC, header), EOFError ...
            raise CheckpointError(f"{what}: damaged: record {name!r} ({_first_line(e)})") from None
    return seen


def _check_digest(metadata: Mapping[str, str], records: Mapping[str, bytes], what: str) -> bool:
    """Whether the metadata carries a digest (False: none); one that does not match the
    records is a :class:`CheckpointError`."""
    stored = metadata.get(DIGEST_KEY)
    if stored is None:
        return False
    if not re.fullmatch(r"[0-9a-f]{64}", stored):
        raise CheckpointError(f"{what}: damaged: its digest {stored[:80]!r} is not a SHA-256")
    actual = records_digest(records)
    if actual != stored:
        raise CheckpointError(
            f"{what}: damaged: its records do not match the digest it was written with "
            f"(sha256 {actual[:12]}... against {stored[:12]}...)"
        )
    return True


def _check_shapes(metadata: Mapping[str, str], graph: Any, what: str) -> None:
    """The metadata's resolution against the program's input, its classes (names and the
    config's ``num_classes``) against the program's output, read from the serialised
    graph: a contradiction would be a traceback in ``predict``, or a silent wrong label."""

    def shape(kind: str, specs: list[dict[str, Any]]) -> list[int | None] | None:
        """The sizes (None where symbolic) of the one tensor of this kind, if one."""
        args = [spec[kind]["arg"] for spec in specs if kind in spec]
        if len(args) != 1 or "as_tensor" not in args[0]:
            return None
        sizes = graph["graph_module"]["graph"]["tensor_values"][args[0]["as_tensor"]["name"]]
        return [size.get("as_int") for size in sizes["sizes"]]

    try:
        signature = graph["graph_module"]["signature"]
        image = shape("user_input", signature["input_specs"])
        logits = shape("user_output", signature["output_specs"])
    except (KeyError, TypeError, AttributeError) as e:
        raise MobileNetError(f"{what}: damaged .pt2 archive ({_first_line(e)})") from None
    if image is None or len(image) != 4 or image[1] != 3 or None in image[2:]:
        raise MobileNetError(f"{what}: its program does not take (batch, 3, H, W) images")
    if "resolution" in metadata:
        text = metadata["resolution"]
        if not (text.isascii() and text.isdecimal() and int(text) > 0):
            raise CheckpointError(
                f"{what}: metadata 'resolution' must be a positive integer, got {text[:80]!r}"
            )
        if image[2:] != [int(text)] * 2:
            raise CheckpointError(
                f"{what}: its metadata says {text}x{text} images, its program takes "
                f"{image[2]}x{image[3]}"
            )
    counts = []  # (what the metadata says, the number)
    with contextlib.suppress(ValueError):  # not JSON: said by the caller that reads it
        classes = json.loads(metadata.get("classes", "null"))
        if isinstance(classes, list):
            counts.append(("names {} classes", len(classes)))
    with contextlib.suppress(ValueError):
        config = json.loads(metadata.get("config", "null"))
        if isinstance(config, dict) and isinstance(config.get("num_classes"), int):
            counts.append(("config has num_classes {}", config["num_classes"]))
    if counts and (logits is None or len(logits) != 2 or logits[1] is None):
        raise CheckpointError(f"{what}: its program's output is not (batch, classes) logits")
    for says, count in counts:
        if count != logits[1]:  # type: ignore[index]
            raise CheckpointError(
                f"{what}: its metadata {says.format(count)}, its program outputs {logits[1]} logits"  # type: ignore[index]
            )


def _check_graph(graph: Any, what: str) -> None:
    """Only ATen operators as node targets, only expressions of our grammar as shapes, no
    line-ending control characters in any string, no guard code, and only plain names
    wherever torch makes a Python identifier of one."""

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

    try:
        walk(graph, None)
        if graph.get("guards_code"):
            raise MobileNetError(f"{what}: holds guard code; only programs without load")
        _check_names(graph, what)
    except MobileNetError:
        raise
    except RecursionError:
        raise MobileNetError(f"{what}: damaged .pt2 archive (nested too deeply)") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise MobileNetError(f"{what}: damaged .pt2 archive ({_first_line(e)})") from None


def _check_names(program: dict[str, Any], what: str) -> None:
    """Every name of the serialised program (``torch/_export/serde/schema.py``) that torch
    turns into a Python identifier, by where the schema keeps it: a plain identifier (see
    :func:`_is_value_name`); parameter, buffer and module paths dotted identifiers."""

    def refuse(kind: str, name: object) -> NoReturn:
        text = name[:80] if isinstance(name, str) else name
        raise MobileNetError(f"{what}: its program names {kind} {text!r}; only plain names load")

    def value(name: object) -> None:
        if not _is_value_name(name):
            refuse("a value", name)

    def tensor(arg: dict[str, Any]) -> None:  # TensorArgument, TokenArgument
        if set(arg) != {"name"}:
            refuse("an argument of fields", sorted(arg))
        value(arg["name"])

    def symbol(arg: dict[str, Any]) -> None:  # SymIntArgument and its float, bool kinds
        ((kind, v),) = arg.items()
        if kind == "as_name":
            value(v)
        elif kind not in ("as_int", "as_float", "as_bool"):
            refuse("a symbol of kind", kind)

    def optional(arg: dict[str, Any]) -> None:  # OptionalTensorArgument
        ((kind, v),) = arg.items()
        if kind == "as_tensor":
            tensor(v)
        elif kind != "as_none":
            refuse("an optional tensor of kind", kind)

    def argument(arg: dict[str, Any]) -> None:  # the Argument union: one kind, one value
        ((kind, v),) = arg.items()
        if kind in _CONSTANT_ARGUMENTS:
            return
        one = {"as_tensor": tensor, "as_optional_tensor": optional}
        many = {"as_tensors": tensor, "as_optional_tensors": optional}
        many |= dict.fromkeys(("as_sym_ints", "as_sym_floats", "as_sym_bools"), symbol)
        if kind in one:
            one[kind](v)
        elif kind in ("as_sym_int", "as_sym_float", "as_sym_bool"):
            symbol(v)
        elif kind in many:
            for item in v:
                many[kind](item)
        elif kind == "as_nested_tensors":
            for items in v:
                for item in items:
                    tensor(item)
        else:
            refuse("an argument of kind", kind)

    module = program["graph_module"]
    graph = module["graph"]
    for arg in [*graph["inputs"], *graph["outputs"]]:
        argument(arg)
    for node in graph["nodes"]:
        if node.get("name") is not None:
            value(node["name"])
        for named in node["inputs"]:
            if not _is_identifier(named["name"]):  # the operator's schema's (``input``)
                refuse("an argument", named["name"])
            argument(named["arg"])
        for arg in node["outputs"]:
            argument(arg)
    for table in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values"):
        for name in graph.get(table, {}):
            value(name)
    if graph.get("custom_obj_values"):
        refuse("custom objects", sorted(graph["custom_obj_values"])[0])
    signature = module["signature"]
    for spec in [*signature["input_specs"], *signature["output_specs"]]:
        ((kind, fields),) = spec.items()
        if kind == "custom_obj":
            refuse("a custom object", fields.get("custom_obj_name"))
        for key, v in fields.items():
            if key == "arg":
                if "name" in v:  # a TensorArgument, else an Argument (user inputs, outputs)
                    tensor(v)
                else:
                    argument(v)
            elif key in ("parameter_name", "buffer_name", "tensor_constant_name"):
                if not _is_path(v):
                    refuse("a parameter", v)
            elif key in ("name", "user_input_name"):
                value(v)
    for entry in module["module_call_graph"]:
        if entry["fqn"] and not _is_path(entry["fqn"]):
            refuse("a module", entry["fqn"])
        call = entry.get("signature")
        if call:
            for arg in [*call["inputs"], *call["outputs"]]:
                argument(arg)
            for name in call.get("forward_arg_names") or []:
                value(name)
            for spec in (call["in_spec"], call["out_spec"]):
                _check_treespec(json.loads(spec)[1], refuse, depth=0)
    if module.get("treespec_namedtuple_fields"):
        refuse("named tuples", sorted(module["treespec_namedtuple_fields"])[0])
    for name in program["range_constraints"]:
        if not _SYMBOL.fullmatch(name):
            refuse("a symbol", name)


def _check_treespec(spec: dict[str, Any], refuse, depth: int) -> None:
    """A pytree spec of ``forward``'s arguments or results: tuples, lists and dicts whose
    keys (which name ``forward``'s keyword arguments) are plain names."""
    if depth > 8 or spec["type"] not in _TREESPEC_TYPES:
        refuse("a structure", spec["type"])
    if spec["type"] == "builtins.dict":
        for key in json.loads(spec["context"]):
            if not _is_value_name(key):
                refuse("a keyword argument", key)
    for child in spec["children_spec"]:
        _check_treespec(child, refuse, depth + 1)


def _is_identifier(name: object) -> bool:
    return (
        isinstance(name, str) and 0 < len(name) <= _NAME_MAX and name.isascii()
        and name.isidentifier()
    )  # fmt: skip


def _is_value_name(name: object) -> bool:
    """Whether ``name`` can be a variable of the code torch.fx generates: an ASCII
    identifier that is no keyword, builtin, global of that code, or dunder."""
    return (
        _is_identifier(name) and name not in _RESERVED
        and not (name.startswith("__") and name.endswith("__"))  # type: ignore[union-attr]
    )  # fmt: skip


def _is_path(path: object) -> bool:
    """Whether ``path`` is a module attribute's path (``features.0.conv.weight``): names
    and indices, which torch.fx writes as ``self.features`` and ``getattr(.., "0")``."""
    if not isinstance(path, str) or not 0 < len(path) <= _PATH_MAX:
        return False
    return all(
        (part.isascii() and part.isdecimal())
        or (_is_identifier(part) and not keyword.iskeyword(part) and not part.startswith("__"))
        for part in path.split(".")
    )


def _safe_expression(text: str) -> bool:
    """Whether ``text`` is a shape expression of our grammar, which follows what
    ``torch.export.save`` writes (sympy's ``srepr``)::

        expr := "Symbol(" 'NAME' ("," FLAG "=" ("True" | "False"))* ")"
              | "Integer(" ["-"] DIGITS ")"
              | FUNCTION "(" expr ("," expr)* ")"

    NAME like ``s77``, FLAG one of :data:`_EXPR_FLAGS`, FUNCTION one of
    :data:`_EXPR_FUNCTIONS`, integers at most 2**31, nesting and length bounded. No power,
    no operator: what it accepts ``sympify`` evaluates at once."""
    if len(text) > _EXPR_MAX_LENGTH:
        return False
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        if match is None:
            return False
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))  # type: ignore[arg-type]
        pos = match.end()
    tokens.append(("end", ""))
    at = 0

    def take(kind: str, *values: str) -> str:
        nonlocal at
        got_kind, got = tokens[at]
        if got_kind != kind or (values and got not in values):
            raise ValueError(got)
        at += 1
        return got

    def peek(value: str) -> bool:
        return tokens[at] == ("op", value)

    def expr(depth: int) -> None:
        if depth > _EXPR_MAX_DEPTH:
            raise ValueError("too deep")
        function = take("name")
        take("op", "(")
        if function == "Symbol":
            if not _SYMBOL.fullmatch(take("str")):
                raise ValueError("symbol")
            while peek(","):
                take("op", ",")
                take("name", *_EXPR_FLAGS)
                take("op", "=")
                take("name", "True", "False")
        elif function == "Integer":
            if peek("-"):
                take("op", "-")
            digits = take("int")
            if len(digits) > 10 or int(digits) > _EXPR_MAX_INT:
                raise ValueError(digits)
        elif function in _EXPR_FUNCTIONS:
            expr(depth + 1)
            while peek(","):
                take("op", ",")
                expr(depth + 1)
        else:
            raise ValueError(function)
        take("op", ")")

    try:
        expr(0)
        take("end")
    except ValueError:
        return False
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
