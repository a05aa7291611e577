"""Reading user images: every mode becomes 3-channel 8-bit RGB; unreadable files are refused.

Checks come in two strengths. :func:`header_problem` reads a file's header only (format,
size, mode: no pixel is decoded), cheap enough to run on every file of a million-image
folder at start-up; :func:`load_rgb` decodes, and turns every way a file can fail into
one :class:`~mobilenet.errors.MobileNetError` line naming it.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import MobileNetError
from ..paths import cache_dir

try:
    import fcntl
except ImportError:  # not POSIX: no lock, each process checks on its own
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "IMAGE_EXTENSIONS",
    "check_headers",
    "check_image_files",
    "find_broken",
    "header_problem",
    "load_rgb",
    "require_regular_file",
    "to_rgb",
]

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency (RGBA, LA, palette with a transparent index) is composited onto
    ``background``, as a viewer shows it, rather than dropped (dropping exposes whatever
    colour the invisible pixels happen to hold). 16- and 32-bit greyscale is rescaled to
    8 bits from its full range instead of being clipped at 255. CMYK, YCbCr, LAB and 1-bit
    images go through PIL's own conversions.
    """
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(array.max()), 1.0)
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB (fully decoded).

    Anything that is not a readable image raises one :class:`MobileNetError` naming the
    file: a missing file, a FIFO or device (refused from ``os.stat`` alone: opening a FIFO
    blocks until some other process writes to it), a text file or other non-image, a
    truncated or corrupt image, and a decompression bomb (more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS``: refused from the header, before anything is decoded).
    """
    require_regular_file(path)
    try:
        with _bombs_refused(), Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MobileNetError(f"{path}: not a readable image (refused: {e})") from None
    except UnidentifiedImageError:
        raise MobileNetError(f"{path}: not a readable image (not an image file)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MobileNetError(f"{path}: not a readable image ({reason})") from None


def require_regular_file(path: str | Path) -> None:
    """Refuse, before anything is read, a path that is missing or not a regular file: a
    folder cannot be decoded, and opening a FIFO would wait for a writer for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MobileNetError(f"image not found: {path}") from None
    except (OSError, ValueError) as e:  # permission, a NUL in the name, a loop
        raise MobileNetError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else _SPECIAL.get(stat.S_IFMT(mode), "special")
        raise MobileNetError(f"{path}: not a readable image ({kind}, not a regular file)")


def check_image_files(paths: list[str]) -> None:
    """Refuse every input that is missing or not a regular file before any is read."""
    for path in paths:
        require_regular_file(path)


_SPECIAL = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


@contextmanager
def _bombs_refused() -> Iterator[None]:
    """PIL only warns between MAX_IMAGE_PIXELS and twice that: make it an error too.

    ``catch_warnings`` changes process-wide state, so this is meant for one thread per
    process, which is how the data loader's workers (processes) call it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def header_problem(path: str) -> str | None:
    """None when ``path`` has a readable image header; else why not. Nothing is decoded.

    About 0.035 ms per small JPEG against 0.07-0.85 ms for a full decode: what makes a
    start-up check of a million files affordable. A file whose header is fine but whose
    data is truncated or corrupt passes, and is found (and skipped) when it is loaded.
    """
    with _bombs_refused():
        return _header_problem(path)


def _header_problem(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            width, height = image.size
            _ = image.mode
        return None if width and height else "no pixels"
    except UnidentifiedImageError:
        return "not an image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"refused: {e}"
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def _headers_chunk(paths: list[str]) -> list[tuple[int, str]]:
    with _bombs_refused():  # once per chunk, not per file
        found = ((i, _header_problem(p)) for i, p in enumerate(paths))
        return [(i, reason) for i, reason in found if reason is not None]


def check_headers(paths: Sequence[str], processes: int | None = None) -> dict[int, str]:
    """The positions in ``paths`` whose image header is unreadable, with the reason.

    Large lists are split over forked processes (PIL's header parsing is Python code, so
    threads would queue on the GIL). With the listing, a million files took 43 s on two
    cores that other work kept half busy (``benchmarks/data_startup.py``).
    """
    if processes is None:
        processes = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    chunks = [list(paths[i : i + _CHUNK]) for i in range(0, len(paths), _CHUNK)]
    fork = "fork" in multiprocessing.get_all_start_methods()
    if processes < 2 or len(paths) < _PARALLEL_FROM or not fork:
        results = [_headers_chunk(chunk) for chunk in chunks]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_headers_chunk, chunks)
    return {k * _CHUNK + i: reason for k, found in enumerate(results) for i, reason in found}


_CHUNK = 4096
_PARALLEL_FROM = 20_000  # below this, starting the processes costs more than they save


def _check(path: Path) -> str | None:
    """None when ``path`` decodes; else the reason it does not."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            if image.format == "JPEG":
                # Decoding at 1/8 scale still reads every byte: finds truncation cheaply.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def find_broken(paths: Sequence[Path], workers: int = 4) -> dict[Path, str]:
    """The files among ``paths`` that cannot be decoded, with the reason for each.

    A full decode of every file: thorough, but 0.14-0.85 ms a file (about 25 minutes for
    ImageNet's 1.28M on two cores), so datasets check headers only (:func:`check_headers`)
    and skip what fails later. Kept for an explicit audit of a folder.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_check, paths))
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


def warn_skipped(broken: dict[Path, str] | dict[str, str], root: Path | None = None) -> None:
    """One warning line for files left out: how many, and the first ten with the reason."""
    if not broken:
        return
    shown = []
    for path, reason in list(broken.items())[:10]:
        name = path
        if isinstance(path, Path) and root is not None and path.is_relative_to(root):
            name = path.relative_to(root)
        shown.append(f"{name} ({reason})")
    more = f", and {len(broken) - 10} more" if len(broken) > 10 else ""
    warnings.warn(
        f"skipped {len(broken)} unreadable image file(s): {', '.join(shown)}{more}",
        stacklevel=2,
    )


def is_image_file(path: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> bool:
    return path.suffix.lower() in tuple(extensions)


# --------------------------------------------------------------------------- folders


@dataclass
class Listing:
    """The image files under ``root/<class>/``: names relative to ``root``, sorted."""

    folders: list[str]  # the sub-folders of root, sorted: the candidate classes
    names: list[str]  # "<class>/<...>/<file>", in the order of sorted path components
    folder: np.ndarray  # int64: the position in ``folders`` of each file's class folder
    sizes: np.ndarray  # int64 bytes
    mtimes: np.ndarray  # int64 nanoseconds


def list_folder(root: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> Listing:
    """Every image file under ``root``'s sub-folders, with its size and mtime.

    ``os.scandir`` gives the type of each entry without a ``stat`` (one ``stat`` per
    image remains, for the size and mtime that key the header cache): about 2.5 s per
    million files. Each folder's entries are sorted by name and sub-folders are visited in
    place, which is the order of ``sorted(Path.rglob("*"))``, so sample indices (and
    thus the data order of a resumed run) are what they were with a plain sorted glob.
    """
    suffixes = frozenset(e.lower() for e in extensions)
    folders = sorted(e.name for e in _entries(root) if e.is_dir())
    names: list[str] = []
    stats: list[tuple[int, int]] = []
    counts = []
    for name in folders:
        before = len(names)
        _walk(root / name, f"{name}/", suffixes, names, stats, set())
        counts.append(len(names) - before)
    columns = np.array(stats, dtype=np.int64).reshape(-1, 2)
    sizes, mtimes = np.ascontiguousarray(columns[:, 0]), np.ascontiguousarray(columns[:, 1])
    folder = np.repeat(np.arange(len(folders), dtype=np.int64), counts)
    return Listing(folders, names, folder, sizes, mtimes)


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as e:
        raise MobileNetError(f"cannot list {folder}: {e.strerror or e}") from None


def _walk(
    folder: Path,
    prefix: str,
    suffixes: frozenset[str],
    names: list[str],
    stats: list[tuple[int, int]],
    seen: set[tuple[int, int]],
) -> None:
    for entry in _entries(folder):
        if entry.is_dir():
            info = entry.stat()
            if (info.st_dev, info.st_ino) not in seen:  # a symlink loop is walked once
                seen.add((info.st_dev, info.st_ino))
                _walk(Path(entry.path), f"{prefix}{entry.name}/", suffixes, names, stats, seen)
        elif os.path.splitext(entry.name)[1].lower() in suffixes and entry.is_file():
            info = entry.stat()  # follows a symlink; a FIFO or socket is not is_file()
            names.append(prefix + entry.name)
            stats.append((info.st_size, info.st_mtime_ns))


def checked_headers(root: Path, listing: Listing) -> dict[int, str]:
    """The files of ``listing`` whose header is unreadable, each file version checked once.

    Verdicts are cached (``$MOBILENET_HOME/image-folders``) by path, size and mtime, and
    the check runs under an exclusive lock on the cache: processes launched together (the
    ranks of ``torchrun``) wait for the first one's check and read its verdicts instead of
    each repeating it, and a later run re-checks only new or changed files. Without a
    writable cache every process checks on its own.
    """
    cache = cache_dir() / "image-folders" / _cache_name(root)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cache.with_suffix(".lock"), "a+b")  # noqa: SIM115 (held for the check)
    except OSError:
        return _problems(root, listing, np.arange(len(listing.names)))
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the kernel releases it if this process dies
        known, fresh = _cached(cache, listing)
        problems = dict(
            sorted({**known, **_problems(root, listing, np.flatnonzero(~fresh))}.items())
        )
        if not fresh.all():
            _save(cache, listing, problems)
    return problems


def _problems(root: Path, listing: Listing, rows: np.ndarray) -> dict[int, str]:
    empty = listing.sizes[rows] == 0  # known from the listing: no need to open them
    problems = {int(i): "empty file" for i in rows[empty]}
    rows = rows[~empty]
    if not len(rows):
        return problems
    found = check_headers([str(root / listing.names[i]) for i in rows])
    problems.update({int(rows[k]): reason for k, reason in found.items()})
    return dict(sorted(problems.items()))  # in listing order, for the warning


def _cache_name(root: Path) -> str:
    return hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:24] + ".npz"


def _cached(cache: Path, listing: Listing) -> tuple[dict[int, str], np.ndarray]:
    """The cached problems still valid, and which files' verdicts are (True) still valid."""
    fresh = np.zeros(len(listing.names), dtype=bool)
    try:
        with np.load(cache, allow_pickle=False) as saved:
            names = saved["names"].tobytes().decode("utf-8", "surrogateescape").split("\0")
            sizes, mtimes = saved["sizes"], saved["mtimes"]
            bad = dict(zip(saved["bad"].tolist(), saved["reasons"].tolist(), strict=True))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return {}, fresh  # no cache yet, or an unreadable one: check everything
    if names == listing.names:  # the usual case: compare whole columns at once
        fresh = (sizes == listing.sizes) & (mtimes == listing.mtimes)
        return {i: r for i, r in bad.items() if fresh[i]}, fresh
    row = {name: j for j, name in enumerate(names)}
    known = {}
    for i, name in enumerate(listing.names):
        j = row.get(name)
        if j is not None and sizes[j] == listing.sizes[i] and mtimes[j] == listing.mtimes[i]:
            fresh[i] = True
            if j in bad:
                known[i] = bad[j]
    return known, fresh


def _save(cache: Path, listing: Listing, problems: dict[int, str]) -> None:
    blob = "\0".join(listing.names).encode("utf-8", "surrogateescape")
    rows = sorted(problems)
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as f:
            np.savez(
                f,
                names=np.frombuffer(blob, dtype=np.uint8),
                sizes=listing.sizes,
                mtimes=listing.mtimes,
                bad=np.array(rows, dtype=np.int64),
                reasons=np.array([problems[i] for i in rows], dtype=str),
            )
        os.replace(partial, cache)  # readers see the old file or the new one, never half
    except OSError:
        partial.unlink(missing_ok=True)  # a full disk: the next run checks again
