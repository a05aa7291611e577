"""Fetching checkpoints by URL into the cache, checked by SHA-256 before use.

A URL's file is cached under a folder named by a hash of the whole URL (the file keeps its
name, for people looking at the cache), so two URLs ending in the same file name never
share a cached file. An expected SHA-256, or a prefix of it, is checked on download and
again each time the cached file is reused.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import CheckpointError, MobileNetError
from ..fileio import atomic_write
from ..paths import cache_dir
from .io import PathLike

__all__ = ["check_sha256", "download", "download_dir", "fetch", "sha256_file"]

TIMEOUT_S = 60  # per socket operation: a stalled server fails instead of hanging forever
_URL = re.compile(r"^(https?|file)://", re.IGNORECASE)


def check_sha256(sha256: str | None) -> str | None:
    """An expected SHA-256 or a prefix of it, normalised to lower case (None: no check).

    At least 8 hexadecimal digits: a shorter prefix would match too many files to be a
    check at all.
    """
    if sha256 is None:
        return None
    digest = str(sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
        raise MobileNetError(
            f"an expected SHA-256 is 8 to 64 hexadecimal digits (a prefix), got {sha256!r}"
        )
    return digest


def download_dir(url: str) -> Path:
    """The cache folder of ``url``: named by a hash of the whole URL."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir() / "downloads" / key


def download(url: str, sha256: str | None = None, directory: PathLike | None = None) -> Path:
    """Fetch ``url`` into the cache (once) and check its SHA-256 (or a prefix) before use.

    ``directory`` replaces the URL's own cache folder (:func:`download_dir`). A cached file
    that does not match ``sha256`` is fetched again (the server's file may have changed);
    a download that does not match is refused and nothing of it is kept.
    """
    expected = check_sha256(sha256)
    folder = Path(directory) if directory is not None else download_dir(url)
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint"
    target = folder / name
    if target.is_file() and (expected is None or _sha256_of(target).startswith(expected)):
        return target

    def write(tmp: Path) -> None:
        digest = _fetch_into(url, tmp)
        if expected is not None and not digest.startswith(expected):
            raise CheckpointError(
                f"{url}: SHA-256 {digest[:16]}... does not match the expected {expected}; "
                "nothing kept"
            )

    atomic_write(target, write)
    return target


def _fetch_into(url: str, tmp: Path) -> str:
    """Copy ``url`` into ``tmp``; its SHA-256, hashed on the way (no second read)."""
    h = hashlib.sha256()

    def failed(e: BaseException) -> CheckpointError:
        return CheckpointError(f"could not download {url}: {str(e) or type(e).__name__}")

    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        raise failed(e) from None
    # Only reading is a download error: an OSError of the writes (a full disk) reaches
    # atomic_write, which names the file it could not write.
    with response, tmp.open("wb") as f:
        while True:
            try:
                chunk = response.read(1 << 20)
            except (OSError, ValueError, http.client.HTTPException) as e:
                raise failed(e) from None
            if not chunk:
                break
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def fetch(spec: PathLike, sha256: str | None = None) -> Path:
    """A local path, or a URL (``https://``, ``http://``, ``file://``) fetched into the
    cache -> a local file; checked against ``sha256`` (or a prefix) when given."""
    spec = str(spec)
    if _URL.match(spec):
        return download(spec, sha256)
    path = Path(spec)
    expected = check_sha256(sha256)
    if expected is not None and path.is_file():  # a missing file is named by its reader
        digest = _sha256_of(path)
        if not digest.startswith(expected):
            raise CheckpointError(
                f"{path}: SHA-256 {digest[:16]}... does not match the expected {expected}"
            )
    return path


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, as 64 hexadecimal digits."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sha256_of(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
