"""A digest of the whole file, kept inside the file: a changed byte is found on load.

The exported formats (ONNX, ExecuTorch ``.pte``, LiteRT ``.tflite``) keep our metadata as a
JSON string stored as it is among the file's bytes. A file is *sealed* by writing its
metadata with :data:`DIGEST_KEY` set to :data:`PLACEHOLDER` (a fixed marker followed by 64
zeros), serialising, and then replacing the 64 zeros with the SHA-256 of the serialised
bytes, zeros included: the replacement has the same length, so no offset of the format
moves. :func:`check_seal` puts the zeros back and hashes again. Every byte of the file,
weights, program and metadata alike, is covered, and no format's own serialiser needs to
reproduce the same bytes twice.

The digest is integrity, not authenticity: anyone can seal a file. It finds a damaged
download, a flipped bit on a disk or a hand-edited weight; what a crafted file may do is
bounded by the loaders' own checks. Files without a seal (older, or foreign) load as
before, with a one-line note.
"""

from __future__ import annotations

import hashlib
import re
import warnings

from .errors import CheckpointError

__all__ = [
    "DIGEST_KEY",
    "PLACEHOLDER",
    "check_seal",
    "note_unsealed",
    "reseal",
    "seal",
    "sealed_metadata",
]

DIGEST_KEY = "digest"
MARKER = "mobilenet-sha256:"
PLACEHOLDER = MARKER + "0" * 64
_SEAL = re.compile(re.escape(MARKER.encode()) + rb"([0-9a-f]{64})")


def sealed_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` with the placeholder that :func:`seal` fills in."""
    return {**metadata, DIGEST_KEY: PLACEHOLDER}


def seal(data: bytes) -> bytes:
    """``data`` (serialised with :func:`sealed_metadata`) with its placeholder replaced by
    the SHA-256 of ``data``."""
    found = [m.start(1) for m in _SEAL.finditer(data)]
    if len(found) != 1 or data[found[0] : found[0] + 64] != b"0" * 64:
        raise RuntimeError(f"expected one digest placeholder in the serialised file, not {found}")
    digest = hashlib.sha256(data).hexdigest().encode()
    return data[: found[0]] + digest + data[found[0] + 64 :]


def reseal(data: bytes) -> bytes:
    """A sealed file's bytes, changed on purpose, sealed again (their digest computed
    anew); ``data`` as it is when it carries no seal."""
    found = _SEAL.search(data)
    if found is None:
        return data
    start = found.start(1)
    return seal(data[:start] + b"0" * 64 + data[start + 64 :])


def note_unsealed(what: str) -> None:
    """The one-line note for a file that carries no digest."""
    warnings.warn(
        f"{what} carries no digest (written by an older version, or not by mobilenet): "
        "it cannot be checked for damage",
        stacklevel=3,
    )


def check_seal(data: bytes, what: str, note: bool = True) -> bool:
    """Whether ``data`` carries a seal (True) or none (False, with the note of
    :func:`note_unsealed` unless ``note`` is False: a reader that may still refuse the file
    gives it once the file has loaded); a seal that does not match the bytes is a
    :class:`CheckpointError` naming ``what``."""
    found = list(_SEAL.finditer(data))
    if not found:
        if note:
            note_unsealed(what)
        return False
    if len(found) > 1:
        raise CheckpointError(f"{what}: damaged (more than one digest)")
    start = found[0].start(1)
    stored = data[start : start + 64].decode()
    view = memoryview(data)  # hashed in place: a copy of a large file costs as much
    digest = hashlib.sha256(view[:start])
    digest.update(b"0" * 64)
    digest.update(view[start + 64 :])
    actual = digest.hexdigest()
    if stored != actual:
        raise CheckpointError(
            f"{what}: damaged: its bytes do not match the digest it was written with "
            f"(sha256 {actual[:12]}... against {stored[:12]}...)"
        )
    return True
