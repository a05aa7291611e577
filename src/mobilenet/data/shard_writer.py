"""Writing an image folder as WebDataset tar shards (``mobilenet shards``).

The class order and the file list are the folder dataset's own; every image is decoded
once, and those that fail are skipped and counted in one warning. A write is all or
nothing: every shard and ``classes.json`` (the class names, each shard's sample count and
size) go into a hidden staging folder inside the destination, and only when all are
written are they renamed into place, ``classes.json`` last. A rename needs no space, so a
full disk, or any other failure while writing, leaves the destination as it was (a
staging folder left by a killed process is removed by the next write of the same prefix).
The readers are in :mod:`mobilenet.data.shards`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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

    from .shards import DECODE_ERRORS, EXTENSIONS

    try:
        data = path.read_bytes()
        if not data:
            return "empty file"
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                # Decoding at 1/8 scale still reads every byte: finds truncation cheaply.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            ext = EXTENSIONS.get(image.format or "", path.suffix.lower().lstrip("."))
        return data, ext
    except UnidentifiedImageError:
        return "not an image"
    except DECODE_ERRORS as e:
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
    are skipped, named in one warning. Nothing appears in ``dst`` until every file is
    written (see the module docstring), so a reader never sees half a data set and a
    failed write leaves ``dst`` as it was.
    """
    if shard_size < 1:
        raise MobileNetError(f"shard size must be positive, got {shard_size}")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise MobileNetError(f"bad shard prefix {prefix!r} (a plain name, e.g. train)")
    import numpy as np

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
    with _staging(dst, prefix) as stage:
        written, broken = _write_all(samples, stage, dst, prefix, shard_size, workers, progress)
        warn_skipped(broken, folder.root)
        if not written:
            raise MobileNetError(f"no readable images in {folder.root}")
        shards = {**kept, **written}
        index = {"format": "webdataset", "classes": folder.classes, "shards": shards}
        text = (json.dumps(index, indent=2) + "\n").encode()
        _write_staged(stage / CLASSES_FILE, dst / CLASSES_FILE, lambda f: f.write(text))
        _commit(stage, dst, [*written, CLASSES_FILE], old)
    last = len(written) - 1
    pattern = _shard_name(prefix, 0) if last == 0 else f"{prefix}-{{000000..{last:06d}}}.tar"
    count = sum(entry["samples"] for entry in written.values())
    paths = [dst / name for name in written]
    return Written(paths, count, len(broken), folder.classes, str(dst / pattern))


@contextlib.contextmanager
def _staging(dst: Path, prefix: str) -> Iterator[Path]:
    """A new hidden folder inside ``dst`` (made if missing) for the files of one write.

    It is removed afterwards, whatever happens; on a failure so is ``dst`` when this write
    made it, and an :class:`OSError` becomes one line naming ``dst``.
    """
    made = [p for p in (dst, *dst.parents) if not os.path.lexists(p)]
    stage = dst / f".{prefix}-shards.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    done = False
    try:
        dst.mkdir(parents=True, exist_ok=True)
        _remove_dead_stages(dst, prefix)
        stage.mkdir()
        yield stage
        done = True
    except OSError as e:
        raise MobileNetError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done:
            for folder in made:  # deepest first; one that holds anything stays
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _remove_dead_stages(dst: Path, prefix: str) -> None:
    """Remove the staging folders of ``prefix`` whose writing process no longer runs."""
    pattern = re.compile(rf"\.{re.escape(prefix)}-shards\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    for entry in os.scandir(dst):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and not _running(int(match[1])):
            shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    if os.name != "posix":  # no cheap probe: assume it runs, and leave its folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _write_staged(path: Path, final: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write`` the staged file ``path``; what the system refuses (a full disk ...) is
    one line naming ``final``, the file it was to become."""
    try:
        with path.open("wb") as f:
            write(f)
    except OSError as e:
        raise MobileNetError(f"cannot write {final}: {e.strerror or e}") from None


def _commit(stage: Path, dst: Path, names: list[str], old: list[Path]) -> None:
    """Rename the staged ``names`` into ``dst`` (``classes.json``, the last one, after the
    shards of an earlier, longer write under the same prefix are removed)."""
    *shards, index = names
    try:
        for name in shards:
            os.replace(stage / name, dst / name)
        for path in old:
            if path.name not in shards:
                path.unlink(missing_ok=True)
        os.replace(stage / index, dst / index)
    except OSError as e:
        raise MobileNetError(f"cannot write {dst}: {e.strerror or e}") from None


def _write_all(
    samples: list[tuple[Path, int]],
    stage: Path,
    dst: Path,
    prefix: str,
    shard_size: int,
    workers: int,
    progress: bool,
) -> tuple[dict[str, dict[str, int]], dict[Path, str]]:
    """Check and write ``samples`` in order into ``stage``; (each shard's entry, the files
    skipped)."""
    from concurrent.futures import ThreadPoolExecutor

    wds = require("webdataset", "data", "writing tar shards")
    broken: dict[Path, str] = {}
    pending: list[tuple[bytes, str, int]] = []
    written: dict[str, dict[str, int]] = {}
    count = 0

    def flush() -> None:
        name = _shard_name(prefix, len(written))
        first = count - len(pending)

        def write(f: BinaryIO) -> None:
            with wds.TarWriter(f, encoder=False, mtime=0) as sink:
                for i, (data, ext, label) in enumerate(pending, start=first):
                    sink.write({"__key__": f"{i:09d}", ext: data, "cls": str(label).encode()})

        _write_staged(stage / name, dst / name, write)
        written[name] = {"samples": len(pending), "bytes": (stage / name).stat().st_size}
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
    from .shards import CLASSES_FILE, read_index

    if not (dst / CLASSES_FILE).is_file():
        return {}
    index = read_index(dst)
    others = {k: v for k, v in index["shards"].items() if not k.startswith(f"{prefix}-")}
    if others and index["classes"] != classes:
        raise MobileNetError(
            f"{dst / CLASSES_FILE} lists other classes for its shards {next(iter(others))}, "
            "...: write these shards to another folder"
        )
    return others


def _bar(total: int, desc: str):
    """A bar on a terminal; none where stderr is a file or a pipe (``disable=None``): the
    command's summary is the stage's one line there."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=None)
