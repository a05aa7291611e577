"""Native runtimes (ExecuTorch, LiteRT) read a file in a child process first.

A changed byte in the structure of a ``.pte`` can abort or segfault ExecuTorch's C++ code
(44 of 550 one-byte changes of a small program measured: XNNPACK's compiler logs a weight
key it cannot find, and the log sink aborts the process when the key is not UTF-8),
which would take ``predict`` or ``eval`` down without a word. ExecuTorch verifies
nothing before it builds a program. LiteRT verifies the flatbuffer first, and none of
1,284 changes of a small ``.tflite`` crashed it here, but its verifier checks the layout,
not the values the kernels are built from, so its files take the same path. Before a
runtime builds a file in this process, :func:`verify_in_child` has
``python -m mobilenet.native`` load it and run it once (batch 1, zeros, at its
resolution) on one thread; a child killed by a signal is one line naming the file, with
the runtime's last message.

The verdict is kept under :func:`mobilenet.paths.cache_dir` by the SHA-256 of the file
and the runtime's version, so a file costs one child once; the exporters record the
files they have just loaded and run themselves (:func:`record_verified`). Only files
that pass are kept: a child killed for another reason (memory, a signal from outside)
must not refuse a good file for ever.

In this process the runtimes' log lines stay off the terminal (:func:`quiet_native_stderr`)
but are kept, so that an error can quote the line that says why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata as distributions
from pathlib import Path

from .errors import MobileNetError
from .fileio import write_json
from .paths import cache_dir

__all__ = [
    "CHILD_TIMEOUT",
    "RUNTIMES",
    "NativeLog",
    "NativeRuntime",
    "last_message",
    "quiet_native_stderr",
    "record_verified",
    "register_runtime",
    "verified_path",
    "verify_in_child",
]

CHILD_TIMEOUT = 300  # seconds; loading and running a MobileNet once takes a few
_VERDICT = "mobilenet-native: "  # the child's verdict line on stdout, among the runtime's
# The runtimes' log prefixes: ExecuTorch's level, time, source file and line (its C++
# logger) or source file and line (through Python); LiteRT's level.
_LOG_PREFIX = re.compile(r"^(?:[DIWEF] \d\d:\d\d:\d\d\.\d+ \S+\] |\[[\w.]+:\d+\] |ERROR: )")
# Lines that say what went well: notes, and the set-up of the thread pool.
_CHATTER = re.compile(r"^(?:INFO: |[DI] \d\d:\d\d|\[(?:threadpool|cpuinfo_utils)\.cpp:)")
# In the child process the log is the evidence: it goes to stderr as it is (see main).
_show_logs = False


@dataclass(frozen=True)
class NativeRuntime:
    """A runtime of native code, and the function its child process runs on a file
    (``module:function``, called with the bytes and the name for messages)."""

    title: str  # as messages name it
    distribution: str  # the package whose version keys the verdicts
    module: str  # imported before the file is read: a failure there is not the file's
    probe: str


RUNTIMES = {  # the file formats' runtimes add theirs with register_runtime
    "executorch": NativeRuntime(
        "ExecuTorch", "executorch", "executorch.runtime", "mobilenet.export.executorch:probe_pte"
    ),
    "litert": NativeRuntime(
        "LiteRT",
        "ai-edge-litert",
        "ai_edge_litert.interpreter",
        "mobilenet.export.litert:probe_tflite",
    ),
}


def register_runtime(key: str, runtime: NativeRuntime) -> None:
    """Add a format's native runtime to :data:`RUNTIMES`, so its files are read in a child
    process first (a format module calls it when it is imported). A key is one runtime's."""
    known = RUNTIMES.setdefault(key, runtime)
    if known != runtime:
        raise RuntimeError(f"two native runtimes are registered as {key!r}")


@dataclass
class NativeLog:
    """What a runtime wrote to stderr inside :func:`quiet_native_stderr` (filled in when
    the block ends)."""

    text: str = ""

    def last_line(self) -> str:
        return last_message(self.text)

    def quote(self, title: str) -> str:
        """``; TITLE said: LINE`` with the log's last line, for an error's reason; empty
        when it has none."""
        line = self.last_line()
        return f"; {title} said: {line}" if line else ""


def last_message(text: str) -> str:
    """The last line of a runtime's log that says something, without its prefix; lines
    that say what went well (notes, the thread pool's set-up) left out."""
    lines = (line.strip() for line in text.splitlines())
    said = [_LOG_PREFIX.sub("", line) for line in lines if line and not _CHATTER.match(line)]
    said = [" ".join(line.split()) for line in said if line.strip()]
    return said[-1][:300] if said else ""


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[NativeLog]:
    """Keep a runtime's log lines (CPU probing, pool resets, load failures) off stderr,
    and in the :class:`NativeLog` it yields: a refusal is one line, which may quote the
    last of them. The C++ code writes some to file descriptor 2, the Python bindings
    others to ``sys.stderr``: both are kept. In the child process of
    :func:`verify_in_child` nothing is muted: a crash would lose what is kept."""
    log = NativeLog()
    if _show_logs:
        yield log
        return
    with contextlib.suppress(AttributeError, ValueError):  # no sys.stderr, or closed
        sys.stderr.flush()
    python = io.StringIO()
    with contextlib.redirect_stderr(python):
        try:
            saved = os.dup(2)
        except OSError:  # no file descriptor 2 (embedded interpreters)
            try:
                yield log
            finally:
                log.text = python.getvalue()
            return
        try:
            with tempfile.TemporaryFile() as sink:
                os.dup2(sink.fileno(), 2)
                try:
                    yield log
                finally:
                    os.dup2(saved, 2)
                    sink.seek(0)
                    native = sink.read().decode(errors="replace")
                    log.text = native + python.getvalue()
        finally:
            os.close(saved)


def verified_path(data: bytes, runtime: str) -> Path:
    """Where the verdict of ``runtime`` (a key of :data:`RUNTIMES`) on ``data`` is kept."""
    version = _version(RUNTIMES[runtime].distribution)
    digest = hashlib.sha256(data).hexdigest()
    return cache_dir() / "native" / f"{runtime}-{version}-{digest}.json"


def record_verified(data: bytes, runtime: str) -> None:
    """Note that ``runtime`` has loaded and run ``data`` without harm (the file's name
    says which file and which version of the runtime)."""
    verdict = {"runtime": runtime, "verdict": "loads and runs"}
    with contextlib.suppress(MobileNetError):  # a cache that cannot be written costs time only
        write_json(verified_path(data, runtime), verdict)


def verify_in_child(data: bytes, what: str, runtime: str) -> None:
    """Have ``runtime`` load and run ``data`` once in a child process, unless a verdict
    is kept; a child that crashes, or refuses the file, is one :class:`MobileNetError`
    naming ``what``."""
    if verified_path(data, runtime).exists():
        return
    chosen = RUNTIMES[runtime]
    title = chosen.title
    try:
        child = subprocess.run(
            [sys.executable, "-m", "mobilenet.native", chosen.module, chosen.probe, title, what],
            input=data,
            capture_output=True,
            env=_child_environment(),
            timeout=CHILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise MobileNetError(
            f"the {title} runtime did not finish reading {what} in {CHILD_TIMEOUT} s: "
            "the file is damaged"
        ) from None
    except OSError as e:
        raise MobileNetError(f"cannot check {what} in a child process: {e}") from None
    verdicts = [
        line[len(_VERDICT) :]
        for line in child.stdout.decode(errors="replace").splitlines()
        if line.startswith(_VERDICT)
    ]
    log = last_message(child.stderr.decode(errors="replace"))
    if child.returncode == 0 and verdicts[-1:] == ["ok"]:
        record_verified(data, runtime)
        return
    if child.returncode == 0 and verdicts and verdicts[-1].startswith("refused: "):
        raise MobileNetError(verdicts[-1].removeprefix("refused: "))
    if "started" not in verdicts:  # not the file: the child could not start
        raise MobileNetError(f"cannot check {what} in a child process ({log or 'no message'})")
    code = child.returncode
    how = _signal_name(-code) if code < 0 else f"exit status {code}"
    message = f"the {title} runtime crashed reading {what} ({how}): the file is damaged"
    raise MobileNetError(f"{message} ({title} said: {log})" if log else message)


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m mobilenet.native RUNTIME MODULE:FUNCTION TITLE NAME`` with
    the file's bytes on stdin (a runtime's module and probe, its title and the file's name
    for messages); its verdict is the last ``mobilenet-native:`` line of stdout, the
    runtime's log goes to stderr as it is."""
    global _show_logs
    runtime, spec, title, what = argv or sys.argv[1:]
    _show_logs = True
    warnings.simplefilter("ignore")  # the verdict's evidence is the runtime's own log
    importlib.import_module(runtime)
    module, function = spec.split(":")
    probe = getattr(importlib.import_module(module), function)
    data = sys.stdin.buffer.read()
    _say("started")
    try:
        probe(data, what)
    except MobileNetError as e:
        _say(f"refused: {e}")
    except Exception as e:  # anything else a runtime raises on a bad file
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        _say(f"refused: {what}: {title} cannot read it ({first})")
    else:
        _say("ok")
    return 0


def _say(verdict: str) -> None:
    print(_VERDICT + verdict, flush=True)


def _child_environment() -> dict[str, str]:
    """The child finds this copy of the package, and runs on one thread; Python's fault
    handler stays off, so the runtime's message is the last line of a crash."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONFAULTHANDLER"}
    package = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@functools.cache
def _version(distribution: str) -> str:
    try:
        return distributions.version(distribution)
    except distributions.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    # Through the package's own module, not this copy run as __main__: the readers consult
    # that module's _show_logs.
    from mobilenet.native import main as child_main

    sys.exit(child_main())
