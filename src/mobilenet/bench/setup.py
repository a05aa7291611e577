"""The engines ``mobilenet bench`` times: their names, the benchmark's settings, and how
each engine is built inside its worker process (see :mod:`mobilenet.bench`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..formats import BenchSetup, engine_named, engines
from ..machine import cores

__all__ = ["ENGINES", "BenchConfig", "build_engine", "timing_model"]

ENGINES = tuple(engines())  # every format's, in the formats' rank order


@dataclass(frozen=True)
class BenchConfig:
    model: str
    width_mult: float = 1.0
    batch: int = 1
    resolution: int = 224
    threads: int = 1
    rounds: int = 7
    iterations: int = 10  # timed calls per round
    ort_spinning: bool | None = None  # None: spin only when threads leave a core free


def timing_model(name: str, width_mult: float = 1.0, resolution: int = 224, seed: int = 0):
    """Model ``name`` with random weights and BatchNorm statistics measured on 8 random
    images, as a trained network's are measured on its data: its activations are
    unit-scale, where an untrained network's default statistics shrink them towards 0.
    Speed does not depend on the values, but an int8 file's graph does (its calibrated
    ranges decide, for example, where ``qdq.fold_marked_shifts`` applies), so the int8
    file timed is shaped like one of trained weights."""
    import torch

    from ..export.metadata import input_size
    from ..export.prepare import measure_batchnorm
    from ..models import create_model

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    size = input_size(resolution)
    images = (torch.randn(4, 3, *size, generator=generator) for _ in range(2))
    return measure_batchnorm(create_model(name, width_mult=width_mult), images)


def build_engine(engine: str, cfg: BenchConfig, tmp: Path) -> Callable[[], object]:
    """A zero-argument callable that runs one batch with ``engine``."""
    import torch

    from ..export.metadata import input_size

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    x = torch.randn(cfg.batch, 3, *input_size(cfg.resolution))  # a side, or [height, width]
    model = timing_model(cfg.model, cfg.width_mult, cfg.resolution)
    spin = cfg.threads < cores() if cfg.ort_spinning is None else cfg.ort_spinning
    setup = BenchSetup(model, x, cfg.resolution, cfg.threads, tmp, spin, _calibration(cfg))
    return engine_named(engine).build(setup)


def _calibration(cfg: BenchConfig) -> Callable[[], Iterator[object]]:
    """The int8 engines' calibration: 8 random images, the same for every engine."""

    def batches() -> Iterator[object]:
        import torch

        generator = torch.Generator().manual_seed(0)
        for _ in range(8):
            yield torch.randn(1, 3, cfg.resolution, cfg.resolution, generator=generator)

    return batches
