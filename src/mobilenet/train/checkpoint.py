"""The run folder's files, each written atomically (a temporary file, then a rename)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..fileio import write_bytes, write_csv, write_json

__all__ = ["load_last", "rng_state", "save_last", "set_rng_state", "write_json", "write_metrics"]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(path: Path, state: dict[str, Any]) -> None:
    # Serialised in memory first: torch.save's own writer reports no error on a full disk.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load_last(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable training checkpoint ({e})") from None


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` with every epoch so far (atomically)."""
    write_csv(path, rows)
