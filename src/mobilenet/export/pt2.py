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

import contextlib
import hashlib
import io
import json
import logging
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import ModelCard
from ..errors import CheckpointError, MobileNetError
from ..fileio import read_bytes, write_bytes
from ..integrity import DIGEST_KEY, note_unsealed
from .check import check_against_pytorch
from .metadata import model_metadata, model_name
from .prepare import prepare_for_inference
from .pt2_program import check_program, first_line, is_path

__all__ = ["META_FILE", "export_pt2", "quiet_torch_export_logs", "read_pt2", "records_digest"]

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
    name = model_name(model)
    try:
        with warnings.catch_warnings(), quiet_torch_export_logs():
            warnings.simplefilter("ignore")
            program = torch.export.export(prepared, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch raises many types for a model it cannot trace
        raise MobileNetError(f"torch.export cannot export {name}: {first_line(e)}") from None
    meta = {**model_metadata(model, resolution), **(metadata or {}), "format": FORMAT}
    meta[DIGEST_KEY] = "0" * 64  # the digest's length: filled in without moving a byte
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta)})
    data = _sealed(buffer.getvalue(), meta)
    loaded, _ = read_pt2(data, "the exported program")  # what eval will load, checked
    diff = check_against_pytorch(
        lambda t: loaded(t).detach().numpy(), model, resolution, "torch.export"
    )
    write_bytes(path, data)
    return diff


def read_pt2(source: str | Path | bytes, name: str = "") -> tuple[nn.Module, dict[str, str]]:
    """The program of a ``.pt2`` written by :func:`export_pt2` (a callable module, guards
    not run) and its metadata; anything else, or a damaged file, is one error."""
    what = name or str(source)
    data = read_bytes(source, what)
    metadata = _inspect(data, what)
    try:
        with warnings.catch_warnings(), quiet_torch_export_logs():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
            module = program.module(check_guards=False)  # guards are code from the file
    except Exception as e:  # torch raises many types for a damaged program
        message = f"{what}: not a program torch.export can load ({first_line(e)})"
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
        raise MobileNetError(f"{what}: not a .pt2 archive ({first_line(e)})") from None
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
                if not is_path(path):
                    raise MobileNetError(f"{what}: its program names {kind} {path[:80]!r}")
        graph = json.loads(contents["models/model.json"])
    except MobileNetError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise MobileNetError(f"{what}: damaged .pt2 archive ({first_line(e)})") from None
    sample = contents["data/sample_inputs/model.pt"]
    if sample:
        try:  # else torch retries with weights_only=False
            torch.load(io.BytesIO(sample), weights_only=True)
        except Exception as e:  # torch raises many types for a bad or unsafe pickle
            raise MobileNetError(f"{what}: sample inputs are not plain tensors ({e})") from None
    check_program(graph, what)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise MobileNetError(f"{what}: not a .pt2 file written by mobilenet export")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise MobileNetError(f"{what}: its mobilenet metadata is damaged")
    del contents[_META_RECORD]  # the digest covers every other record
    sealed = _check_digest(metadata, contents, what)
    _check_shapes(metadata, graph, what)
    if not sealed:  # after every refusal: a refused file gets one line, not two
        note_unsealed(what)
    return metadata


def _check_archive(data: bytes, what: str) -> set[str]:
    """The names of the records of a zip archive whose records are stored, named once,
    under one folder, and match their CRC-32 (torch's reader does not check them)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError ...
        raise MobileNetError(f"{what}: not a .pt2 archive ({first_line(e)})") from None
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
            raise CheckpointError(f"{what}: damaged: record {name!r} ({first_line(e)})") from None
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
        raise MobileNetError(f"{what}: damaged .pt2 archive ({first_line(e)})") from None
    if image is None or len(image) != 4 or image[1] != 3 or None in image[2:]:
        raise MobileNetError(f"{what}: its program does not take (batch, 3, H, W) images")
    card = ModelCard.read(metadata, what)  # damage is one line naming the file
    if card.input_size is not None and image[2:] != list(card.input_size):
        height, width = card.input_size
        raise CheckpointError(
            f"{what}: its metadata says {height}x{width} images, its program takes "
            f"{image[2]}x{image[3]}"
        )
    counts = []  # (what the metadata says, the number)
    if card.classes is not None:
        counts.append(("names {} classes", len(card.classes)))
    if card.num_classes is not None:
        counts.append(("config has num_classes {}", card.num_classes))
    if counts and (logits is None or len(logits) != 2 or logits[1] is None):
        raise CheckpointError(f"{what}: its program's output is not (batch, classes) logits")
    for says, count in counts:
        if count != logits[1]:  # type: ignore[index]
            outputs = logits[1]  # type: ignore[index]
            raise CheckpointError(
                f"{what}: its metadata {says.format(count)}, its program outputs {outputs} logits"
            )


@contextlib.contextmanager
def quiet_torch_export_logs() -> Iterator[None]:
    """Keep torch.export's logged warnings (with tracebacks) off stderr while it runs, so
    that a refusal is one line (the .pt2, .pte and .tflite exporters all trace with it)."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch._dynamo")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:  # their children log at the level they inherit
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)
