"""Atomic file writes: a reader, or a crash, never sees half a file.

Every writer of the toolkit goes through :func:`atomic_write`, so one place turns what the
operating system refuses (a full disk, a read-only folder, a path inside a file ...) into
one :class:`~mobilenet.errors.MobileNetError` line, and one place cleans up temporary
files. A temporary file is named ``.{name}.{pid}.{random}.tmp``: the process id says
whether its writer still runs, so the leftovers of a killed process are removed by the
next write of the same file instead of piling up.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import MobileNetError

__all__ = ["atomic_write", "read_bytes", "write_bytes", "write_csv", "write_json"]

# Room left in a file name for ".{pid}.{random}.tmp" around the target's name.
_NAME_MAX = 255
_TMP_EXTRA = len(".") + 10 + len(".") + 8 + len(".tmp")
_ANY_TMP = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")
# Folder -> the names of temporary files in it when this process first wrote there.
_TEMPORARIES: dict[str, list[str]] = {}


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any error the temporary file (and any folder made for ``path``) is removed and
    ``path`` is left as it was; an :class:`OSError` (raised by ``write`` or by the file
    system) becomes a :class:`MobileNetError` ``cannot write PATH: REASON``. A ``path``
    that is a folder is refused before anything is written. The file gets the usual
    permissions (0666 minus the umask).
    """
    path = Path(path)
    if os.path.isdir(path):  # os.path, not Path: False, not an error, for an overlong path
        raise MobileNetError(f"cannot write {path}: it is a folder")
    created = _make_parent(path)
    tmp = None
    try:
        if len(os.fsencode(path.name)) > _name_max(path.parent):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        _remove_orphans(path)
        tmp = path.parent / f"{_tmp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}.tmp"
        # O_EXCL: the name is ours alone; mode 0666 lets the umask decide, as for any file.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            _unlink(tmp)
        _remove_empty(created)  # a failed write leaves no empty folders either
        if isinstance(e, OSError):
            raise _error(path, e, tmp) from None
        raise


def read_bytes(source: str | Path | bytes, what: str) -> bytes:
    """The bytes of a file (or ``source`` itself, already in memory); an unreadable file
    is one :class:`MobileNetError` naming ``what``."""
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise MobileNetError(f"{what}: cannot be read ({e.strerror or e})") from None


def write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` to ``path``, atomically: for what a library serialises into memory."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON (non-JSON values as strings), atomically."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` (dicts with the same keys) as CSV with a header, atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _make_parent(path: Path) -> list[Path]:
    """Create the folders above ``path``; those it created, deepest first."""
    created = []
    for folder in path.parents:
        if os.path.lexists(folder):
            break
        created.append(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        # mkdir says "File exists" when a file stands where a folder should: name that file.
        blocker = next(
            (p for p in path.parents if os.path.exists(p) and not os.path.isdir(p)), None
        )
        if blocker is not None:
            message = f"cannot write {path}: {blocker} is a file, not a folder"
            raise MobileNetError(message) from None
        raise _error(path, e) from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one another writer has filled stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no answer
        return _NAME_MAX


def _tmp_prefix(path: Path) -> str:
    # A long name is cut so that the temporary name stays within the file system's limit;
    # two targets sharing the cut prefix only ever remove each other's orphans.
    name = path.name
    while len(os.fsencode(f".{name}.")) + _TMP_EXTRA > _NAME_MAX:
        name = name[:-1]
    return f".{name}."


def _remove_orphans(path: Path) -> None:
    """Remove the temporary files of ``path`` whose writing process no longer runs.

    A folder is listed once per process, at its first write (listing it at every write
    made writing 10,000 pictures into one folder 100 times slower); a writer killed before
    this process started is found then, and one killed later by the next process.
    """
    if os.name != "posix":  # os.kill(pid, 0) probes a process on POSIX only
        return
    folder = os.path.abspath(path.parent)
    found = _TEMPORARIES.get(folder)
    if found is None:
        try:
            found = [e.name for e in os.scandir(folder) if _ANY_TMP.fullmatch(e.name)]
        except OSError:
            return  # an unreadable folder: the write itself will say what is wrong
        _TEMPORARIES[folder] = found
    if not found:
        return
    pattern = re.compile(re.escape(_tmp_prefix(path)) + r"(\d+)\.[0-9a-f]{8}\.tmp")
    for name in list(found):
        match = pattern.fullmatch(name)
        if match and not _running(int(match.group(1))):
            _unlink(Path(folder, name))
            with contextlib.suppress(ValueError):  # another thread removed it first
                found.remove(name)


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user; anything else: assume it runs
        return True
    return True


def _unlink(path: Path) -> None:
    # Cleaning up must not hide the error that made it necessary.
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _error(path: Path, e: OSError, tmp: Path | None = None) -> MobileNetError:
    """``cannot write PATH: REASON``, naming another file only when the error is about one."""
    reason = e.strerror or str(e) or type(e).__name__
    other = e.filename
    if other is not None and str(other) not in {str(path), str(tmp), str(path.parent)}:
        reason += f": {other}"
    return MobileNetError(f"cannot write {path}: {reason}")
