"""File formats as plugins: one module of this package per format, found on first use.

Each module defines ``FORMAT``, a :class:`Format`: the name ``--format`` takes, the
suffix ``eval`` and ``predict`` know its files by, the extra that installs its
runtime, ``export`` (and ``quantize`` where it has one), ``load`` (the runnable model
with its :class:`~mobilenet.card.ModelCard`) and the :class:`Engine` objects it gives
``bench`` and ``predict --engine``. ``export``, ``quantize``, ``eval``, ``predict`` and
``bench`` dispatch through :func:`formats` and :func:`engines`; adding a format is
adding a module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import MobileNetError
from ..extras import available, require

if TYPE_CHECKING:
    from ..card import ModelCard
    from ..deployed import Trained

__all__ = [
    "BenchCase",
    "BenchSetup",
    "Engine",
    "Exported",
    "Format",
    "LoadRequest",
    "QuantizeRequest",
    "engine_named",
    "engines",
    "format_named",
    "format_of",
    "formats",
    "runtime_engines",
    "square_classifiers_only",
]


@dataclass(frozen=True)
class LoadRequest:
    """What the command line asked of a file: a flag may agree with it, not contradict."""

    model: str | None = None
    width_mult: float | None = None
    resolution: int | None = None


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the largest difference from PyTorch on its check batches,
    the runtime that ran the check, and the batch sizes the file takes."""

    diff: float
    checked_by: str
    batch: str


@dataclass(frozen=True)
class QuantizeRequest:
    """``mobilenet quantize``'s settings for one int8 file."""

    data: str  # calibration (PTQ) or fine-tuning (QAT) images: a folder or a built-in set
    out: Path
    images: int = 512  # calibration images
    integer_only: bool = False
    method: str = "ptq"  # what a format's quantize runs: ptq (QAT is a training run)
    progress: Callable[[str], None] = print


@dataclass(frozen=True)
class BenchSetup:
    """What an engine needs to be timed: the model (random weights, measured BatchNorm),
    the input batch, the thread count and a folder for its files."""

    model: nn.Module
    images: torch.Tensor
    resolution: int | tuple[int, int]
    threads: int
    tmp: Path
    spin: bool = True  # ONNX Runtime: let idle pool threads spin
    calibration: Callable[[], Iterator[torch.Tensor]] | None = None  # int8 engines


@dataclass(frozen=True)
class BenchCase:
    """What ``bench`` is asked to time: a model at a width, a batch, a square input or not."""

    model: str
    width: float = 1.0
    batch: int = 1
    square: bool = True


def _times_anything(case: BenchCase) -> str | None:
    return None


def square_classifiers_only(engine: str) -> Callable[[BenchCase], str | None]:
    """``refuses`` of an engine whose files take one side and a classifier's logits."""

    def refuses(case: BenchCase) -> str | None:
        from ..models import list_models, model_task

        if case.model not in list_models():  # the classifiers
            return f"{engine} runs square classifiers only, not {model_task(case.model)} models"
        if not case.square:
            return f"{engine} runs square classifiers only, not non-square inputs"
        return None

    return refuses


@dataclass(frozen=True)
class Engine:
    """A way of running a classifier, timed by ``bench`` and chosen by ``predict``.

    ``build`` makes a zero-argument callable that runs ``setup.images`` once. A float32
    engine with ``predicts`` runs ``predict --engine NAME`` on float weights: its format
    exports them once into the cache and loads the file back (int8 engines never do:
    quantizing changes the model, and only the user's own int8 file may)."""

    name: str
    build: Callable[[BenchSetup], Callable[[], object]]
    precision: str = "float32"  # float32 | int8 | bf16
    modules: tuple[str, ...] = ()  # Python modules it needs
    extra: str | None = None  # the extra that installs them
    predicts: bool = False
    format: str | None = None  # the format whose files it runs (None: PyTorch in process)
    in_process: Callable[[nn.Module], nn.Module] | None = None  # predict: the module it runs
    fallback: int = 0  # predict --engine auto without a record: the highest available wins
    # Why it cannot time a case (None: it can): refused when asked for by name, else
    # left out (a square-only export, a batch above a program's bound, no bf16 here).
    refuses: Callable[[BenchCase], str | None] = _times_anything
    # Left out, with a note, where it does not apply, even when asked for by name: a
    # comparison (torchvision's own model) rather than a way of running ours.
    applies: Callable[[BenchCase], bool] = field(default=lambda case: True)

    def available(self) -> bool:
        return all(available(m) for m in self.modules)

    def require(self) -> None:
        """Refuse in one line, naming the extra, when the engine's runtime is missing."""
        for module in self.modules:
            require(module, self.extra or "all", f"the {self.name} engine")


def runtime_engines(
    fmt: Format,
    runtime: str,
    bench: Callable[[BenchSetup, bool], Callable[[], object]],
    refuses: Callable[[str], Callable[[BenchCase], str | None]],
) -> tuple[Engine, Engine]:
    """A format's two engines: ``runtime`` on its float32 files (``predict`` runs float
    weights on it) and ``runtime-int8``; ``bench(setup, int8)`` builds either, and
    ``refuses(name)`` says what each cannot time."""
    common = {"modules": fmt.modules, "extra": fmt.extra, "format": fmt.name}
    int8 = f"{runtime}-int8"
    return (
        Engine(
            runtime, lambda s: bench(s, False), predicts=True, refuses=refuses(runtime), **common
        ),
        Engine(int8, lambda s: bench(s, True), precision="int8", refuses=refuses(int8), **common),
    )


class Format:
    """A model file format. Subclasses set the class attributes and override what the
    format supports; what it does not is refused in one line by the defaults."""

    name: str = ""  # the value of --format
    suffix: str = ""  # its files' suffix (eval and predict tell a file's format by it)
    extra: str | None = None  # pip install "mobilenet[EXTRA]"
    modules: tuple[str, ...] = ()  # the Python modules its export and load need
    summary: str = ""  # one line for --help
    tasks: tuple[str, ...] = ("classification",)  # the tasks it exports
    quantizes: bool = False  # has an int8 ``quantize``
    methods: tuple[str, ...] = ("ptq",)  # the quantization methods it has
    integer_only: bool = False  # takes --integer-only
    options: tuple[str, ...] = ()  # the export options it takes (export --opset: "opset")
    names_files: bool = True  # its files must carry its suffix (read back by it)
    keeps_metadata: bool = True  # keeps a model card (TorchScript does not)
    loads: bool = True  # eval and predict read it
    rank: int = 50  # where it is listed (--format choices, bench's engines)

    def require(self, purpose: str) -> None:
        for module in self.modules:
            require(module, self.extra or "all", purpose)

    def export(
        self, model: nn.Module, path: Path, resolution: Any, card: ModelCard, **options: Any
    ) -> Exported:
        """Write ``model`` taking ``resolution`` images, ``card`` in its metadata, checked
        against PyTorch before the file is in place."""
        raise MobileNetError(f"{self.name} files are not written by export")

    def quantize(self, trained: Trained, request: QuantizeRequest) -> str:
        """Write an int8 file of ``trained`` calibrated on ``request.data``; returns how
        (one clause for the command's line)."""
        raise MobileNetError(f"quantize does not write {self.name} files")

    def load(self, path: Path, request: LoadRequest) -> Trained:
        """The runnable model a file holds, with its card; its metadata checked against
        the program it describes."""
        raise MobileNetError(f"{path}: {self.name} files are not read by eval and predict")

    def engines(self) -> tuple[Engine, ...]:
        return ()

    def metadata(self, path: Path) -> dict[str, str]:
        """The key/values a file keeps (its card and its format's own), read without
        building a runnable model where the format allows."""
        raise MobileNetError(f"{path}: {self.name} files are not read by eval and predict")

    def task_of(self, path: Path) -> str:
        """The task of the model a file holds, for the commands that dispatch on it."""
        return "classification"  # ONNX, ExecuTorch and LiteRT read theirs from the card

    @property
    def exports(self) -> bool:
        return type(self).export is not Format.export

    def claims(self, path: Path, metadata: dict[str, str] | None) -> bool:
        """Whether this format reads ``path`` (by its suffix; a format sharing a suffix
        with another, such as int8 safetensors, looks at ``metadata``)."""
        return path.suffix == self.suffix


@cache
def formats() -> dict[str, Format]:
    """Every format (the ``FORMAT`` of each module here), by name, in ``rank`` order."""
    found: dict[str, Format] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        fmt = getattr(module, "FORMAT", None)
        if isinstance(fmt, Format):
            if fmt.name in found:
                raise RuntimeError(f"two formats are named {fmt.name!r}")
            found[fmt.name] = fmt
    return dict(sorted(found.items(), key=lambda item: (item[1].rank, item[0])))


def format_named(name: str) -> Format:
    known = formats()
    if name not in known:
        raise MobileNetError(f"unknown format {name!r}; choose from {', '.join(known)}")
    return known[name]


def format_of(path: Path, metadata: dict[str, str] | None = None) -> Format | None:
    """The format that reads ``path`` (None: not an exported file, but weights)."""
    return next((f for f in formats().values() if f.claims(path, metadata)), None)


@cache
def engines() -> dict[str, Engine]:
    """Every engine of every format, by name."""
    found: dict[str, Engine] = {}
    for fmt in formats().values():
        for engine in fmt.engines():
            if engine.name in found:
                raise RuntimeError(f"two engines are named {engine.name!r}")
            found[engine.name] = engine
    return found


def engine_named(name: str) -> Engine:
    known = engines()
    if name not in known:
        raise MobileNetError(f"unknown engine {name!r}; choose from {', '.join(known)}")
    return known[name]
