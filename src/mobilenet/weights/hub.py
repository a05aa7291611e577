"""Fetching checkpoints by URL into the cache, checked by SHA-256 before use."""

from __future__ import annotations

import hashlib
import re
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import CheckpointError
from ..fileio import atomic_write
from ..paths import cache_dir
from .io import PathLike

__all__ = ["download", "fetch", "sha256_file"]


def download(url: str, sha256: str | None = None, directory: PathLike | None = None) -> Path:
    """Fetch ``url`` into the cache (once) and check its SHA-256 (or prefix) before use."""
    directory = Path(directory) if directory is not None else cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint"
    target = directory / name
    if target.is_file() and (sha256 is None or sha256_file(target).startswith(sha256)):
        return target

    def write(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url) as response, tmp.open("wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            raise CheckpointError(f"could not download {url}: {e}") from None
        if sha256 is not None and not (digest := sha256_file(tmp)).startswith(sha256):
            raise CheckpointError(
                f"{url}: SHA-256 {digest[:16]}... does not match the expected {sha256}"
            )

    atomic_write(target, write)
    return target


def fetch(spec: PathLike, sha256: str | None = None) -> Path:
    """A local path, or a URL (``https://``, ``http://``, ``file://``) fetched into the
    cache -> a local file."""
    spec = str(spec)
    if re.match(r"^(https?|file)://", spec):
        return download(spec, sha256)
    return Path(spec)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
