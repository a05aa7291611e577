"""Writing an image folder as WebDataset tar shards (``mobilenet shards``).

The class order and the file list are the folder dataset's own; every image is decoded
once, and those that fail are skipped and counted in one warning; each shard is written
atomically, and ``classes.json`` (the class names, each shard's sample count and size)
last. The readers are in :mod:`mobilenet.data.shards`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MobileNetError
from ..extras import require

__all__ = ["Written", "write_shards"]


@dataclass
class Written:
    shards: list[Path]
    samples: int
    skipped: int
    classes: list[str]
    pattern: str  # what --data takes, e.g. DST/train-{000000..000002}.tar


def _encoded(path: Path) -> tuple[bytes, str] | str:
    """The file's bytes and the extension of its real format; or why it does not decode."""
    from PIL import Image, UnidentifiedImageError

    from .shards import _DECODE_ERRORS, _EXTENSIONS

    try:
        data = path.read_bytes()
        if not data:
            return "empty file"
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                # Decoding at 1/8 scale still reads every byte: finds truncation cheaply.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            ext = _EXTENSIONS.get(image.format or "", path.suffix.lower().lstrip("."))
        return data, ext
    except UnidentifiedImageError:
        return "not an image"
    except _DECODE_ERRORS as e:
        return str(e) or type(e).__name__


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_shards(
    src: str | Path,
    dst: str | Path,
    shard_size: int = 1000,
    prefix: str = "train",
    seed: int = 0,
    overwrite: bool = False,
    workers: int = 4,
    progress: bool = False,
) -> Written:
    """Write the image folder ``src`` as tar shards of ``shard_size`` images in ``dst``.

    The images go in a random order (fixed by ``seed``) so that every shard mixes the
    classes: a streaming reader shuffles only within a buffer. Files that do not decode
    are skipped, named in one warning. Each shard is written under a temporary name and
    renamed, and ``classes.json`` last, so a reader never sees half a data set.
    """
    if shard_size < 1:
        raise MobileNetError(f"shard size must be positive, got {shard_size}")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise MobileNetError(f"bad shard prefix {prefix!r} (a plain name, e.g. train)")
    import numpy as np

    from ..fileio import write_json
    from .datasets import ImageFolder
    from .images import warn_skipped
    from .shards import CLASSES_FILE

    folder = ImageFolder(src, check=False)  # the folder datasets' classes and files
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise MobileNetError(f"{dst} exists and is not a folder")
    old = sorted(dst.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")) if dst.is_dir() else []
    if old and not overwrite:
        raise MobileNetError(
            f"{dst} already holds {prefix}-*.tar shards: pass --overwrite, or another folder"
        )
    kept = _kept_entries(dst, prefix, folder.classes)
    listed = folder.samples  # (path, class index), built afresh on every access
    samples = [listed[i] for i in np.random.default_rng(seed).permutation(len(listed))]
    written, broken = _write_all(samples, dst, prefix, shard_size, workers, progress)
    warn_skipped(broken, folder.root)
    if not written:
        raise MobileNetError(f"no readable images in {folder.root}")
    for path in old:  # shards of an earlier, longer write under the same prefix
        if path.name not in written:
            path.unlink(missing_ok=True)
    index = {"format": "webdataset", "classes": folder.classes, "shards": {**kept, **written}}
    write_json(dst / CLASSES_FILE, index)
    last = len(written) - 1
    pattern = _shard_name(prefix, 0) if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"
    count = sum(entry["samples"] for entry in written.values())
    paths = [dst / name for name in written]
    return Written(paths, count, len(broken), folder.classes, str(dst / pattern))


def _write_all(
    samples: list[tuple[Path, int]],
    dst: Path,
    prefix: str,
    shard_size: int,
    workers: int,
    progress: bool,
) -> tuple[dict[str, dict[str, int]], dict[Path, str]]:
    """Check and write ``samples`` in order; (each shard's entry, the files skipped)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..fileio import atomic_write

    wds = require("webdataset", "data", "writing tar shards")
    broken: dict[Path, str] = {}
    pending: list[tuple[bytes, str, int]] = []
    written: dict[str, dict[str, int]] = {}
    count = 0

    def flush() -> None:
        path = dst / _shard_name(prefix, len(written))
        first = count - len(pending)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
                for i, (data, ext, label) in enumerate(pending, start=first):
                    sink.write({"__key__": f"{i:09d}", ext: data, "cls": str(label).encode()})

        atomic_write(path, write)
        written[path.name] = {"samples": len(pending), "bytes": path.stat().st_size}
        pending.clear()

    bar = _bar(len(samples), "checking and writing") if progress else None
    chunk = 64 * max(1, workers)  # bounded read-ahead: a shard's images, not the folder's
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(samples), chunk):
            part = samples[start : start + chunk]
            results = pool.map(_encoded, [p for p, _ in part])
            for (path, label), result in zip(part, results, strict=True):
                if isinstance(result, str):
                    broken[path] = result
                    continue
                pending.append((*result, label))
                count += 1
                if len(pending) == shard_size:
                    flush()
            if bar is not None:
                bar.update(len(part))
        if pending:
            flush()
    if bar is not None:
        bar.close()
    return written, broken


def _kept_entries(dst: Path, prefix: str, classes: list[str]) -> dict[str, Any]:
    """The entries of ``dst/classes.json`` for other prefixes' shards (e.g. val-*.tar),
    kept when they index the same classes."""
    from .shards import CLASSES_FILE, _read_index

    if not (dst / CLASSES_FILE).is_file():
        return {}
    index = _read_index(dst)
    others = {k: v for k, v in index["shards"].items() if not k.startswith(f"{prefix}-")}
    if others and index["classes"] != classes:
        raise MobileNetError(
            f"{dst / CLASSES_FILE} lists other classes for its shards {next(iter(others))}, "
            "...: write these shards to another folder"
        )
    return others


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)
