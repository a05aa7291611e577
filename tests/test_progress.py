"""Progress that fits the output: bars on a terminal, one line per epoch in a log file or
a pipe (``mobilenet train ... > log 2>&1`` keeps a readable log)."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from .helpers import ENV

EPOCHS = 2
TINY = [
    "train", "--data", "digits", "--resolution", "32", "--epochs", str(EPOCHS),
    "--batch-size", "64", "--workers", "0", "--model", "mobilenet_v3_small",
    "--width-mult", "0.5",
]  # fmt: skip


def _train(out: Path, **streams) -> int:
    command = [sys.executable, "-m", "mobilenet", *TINY, "--out", str(out)]
    return subprocess.run(command, env=ENV, timeout=900, **streams).returncode


@pytest.mark.slow
def test_a_log_file_gets_one_line_per_epoch_and_no_bar(tmp_path):
    log = tmp_path / "log"
    with log.open("wb") as f:  # as `mobilenet train ... > log 2>&1`
        code = _train(tmp_path / "run", stdout=f, stderr=subprocess.STDOUT)
    data = log.read_bytes()
    text = data.decode()
    assert code == 0, text
    assert b"\r" not in data, text  # no bar redraws
    assert "it/s" not in text and "s/it" not in text and "%|" not in text, text
    lines = text.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == EPOCHS, text
    assert "" not in lines, text  # no blank line where a bar was cleared
    # The epoch lines, the summary (done in ..., weights, curves, metrics), nothing more.
    assert len(lines) <= EPOCHS + 6, text


@pytest.mark.slow
def test_a_terminal_gets_progress_bars(tmp_path):
    """stderr on a pseudo-terminal: the bars are drawn there (stdout, a pipe, keeps the
    epoch lines)."""
    main, child = pty.openpty()
    # 24 rows of 100 columns: a terminal of no width gets bars of no width
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    drawn = bytearray()

    def drain() -> None:  # a full terminal buffer would block the run
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the run closed its end
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mobilenet", *TINY, "--out", str(tmp_path / "run")],
            env=ENV,
            timeout=900,
            stdout=subprocess.PIPE,
            stderr=child,
        )
    finally:
        os.close(child)
        reader.join(timeout=10)
        os.close(main)
    terminal = drawn.decode(errors="replace")
    assert result.returncode == 0, terminal
    assert "\r" in terminal and f"epoch 1/{EPOCHS}" in terminal, terminal
    epochs = [line for line in result.stdout.decode().splitlines() if line.startswith("epoch ")]
    assert len(epochs) == EPOCHS
