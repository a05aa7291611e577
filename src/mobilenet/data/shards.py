"""WebDataset tar shards: an image folder written as a few large files, read as a stream.

Millions of small files are slow to list, check and copy to many machines; a few hundred
tar files read front to back are fast everywhere. ``mobilenet shards SRC DST`` (see
:mod:`mobilenet.cli.data`) writes them as WebDataset does:

* ``DST/train-000000.tar``, ... each sample ``<key>.<jpg|png|...>`` (the image file's
  bytes, unchanged) and ``<key>.cls`` (its class index, ASCII);
* ``DST/classes.json``: the class names in index order (sorted folder names, as the
  folder datasets have them) and each shard's sample count and size, so a reader plans
  an epoch without opening every shard.

Training reads them with :class:`ShardStream`, an ``IterableDataset``: every process
(torchrun rank) and every DataLoader worker reads its own contiguous part of the
epoch's stream, so each byte is read once per epoch across the cluster. Evaluation uses
:class:`ShardImages`, a map-style set with random access into the tars, so that the
evaluation sampler gives every image to exactly one process.

A sample whose image does not decode, or whose ``.cls`` is not an integer, is replaced
(training) or refused (evaluation); a ``.cls`` outside the classes of ``classes.json``
(``-1``, or shards indexing another class list) is refused in both, naming the shard and
the sample: Python would read ``-1`` as the last class, and the scores would be wrong
without a word.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import MobileNetError
from ..extras import require
from .images import to_rgb

__all__ = [
    "CLASSES_FILE",
    "DECODE_ERRORS",
    "EXTENSIONS",
    "ShardImages",
    "ShardList",
    "ShardStream",
    "is_shards",
    "list_shards",
    "read_index",
]

Transform = Callable[[object], torch.Tensor]
CLASSES_FILE = "classes.json"
SHUFFLE_BUFFER = 1000  # samples (encoded bytes) a worker shuffles among
# PIL format -> the extension WebDataset readers decode it by
EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "PPM": "ppm",
}
_IMAGE_EXTS = frozenset({*EXTENSIONS.values(), "jpeg", "pgm", "tif"})
_END = object()  # the end of an iterator whose items may be None
DECODE_ERRORS = (OSError, ValueError, SyntaxError, KeyError, Image.DecompressionBombError)

# --------------------------------------------------------------------------- finding


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int


@dataclass(frozen=True)
class ShardList:
    """Tar shards checked to exist, with their sample counts and the classes they index."""

    source: str  # the pattern or folder, for messages
    shards: tuple[Shard, ...]
    classes: tuple[str, ...]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def label_map(self, classes: Sequence[str] | None) -> list[int]:
        """Each stored class index -> the index of the same name in ``classes`` (e.g. a
        validation set's shards, indexed by its own classes, against the model's)."""
        if classes is None:
            return list(range(len(self.classes)))
        position = {c: i for i, c in enumerate(classes)}
        if unknown := [c for c in self.classes if c not in position]:
            raise MobileNetError(f"{self.source}: classes not in the model: {', '.join(unknown)}")
        return [position[c] for c in self.classes]


def is_shards(data: str) -> bool:
    """Whether ``data`` names tar shards: a pattern or path ending in ``.tar``, or a folder
    holding ``.tar`` files (an image folder holds class sub-folders instead)."""
    path = Path(data)
    if path.is_dir():
        return any(path.glob("*.tar"))
    return data.endswith(".tar")


def list_shards(data: str) -> ShardList:
    """The shards ``data`` names: ``DIR/train-{000000..000127}.tar`` (brace pattern, as
    WebDataset writes it; ``::`` joins several), one ``.tar``, or a folder (all its
    ``.tar`` files). Their ``classes.json`` must lie beside them."""
    folder = Path(data)
    if folder.is_dir():
        paths = sorted(folder.glob("*.tar"))
        if not paths:
            raise MobileNetError(f"no .tar shards in {folder}")
    else:
        if "://" in data or data.startswith("pipe:"):
            raise MobileNetError(f"shards are read from local files; cannot read {data}")
        shardlists = require("webdataset.shardlists", "data", "reading tar shards")
        try:
            paths = [Path(url) for url in shardlists.expand_urls(data)]
        except Exception as e:  # braceexpand: unbalanced braces and the like
            raise MobileNetError(f"bad shard pattern {data!r}: {e}") from None
        if len(set(paths)) != len(paths):
            raise MobileNetError(f"shard pattern {data!r} names a shard twice")
        if missing := [p for p in paths if not p.is_file()]:
            more = f" (and {len(missing) - 1} more of {len(paths)})" if len(missing) > 1 else ""
            raise MobileNetError(f"shard not found: {missing[0]}{more}")
    indexes = {d: read_index(d) for d in dict.fromkeys(p.parent for p in paths)}
    classes = next(iter(indexes.values()))["classes"]
    for d, index in indexes.items():
        if index["classes"] != classes:
            raise MobileNetError(f"{d / CLASSES_FILE} lists other classes than the other shards")
    shards = []
    for path in paths:
        entry = indexes[path.parent]["shards"].get(path.name)
        size = path.stat().st_size
        # A shard rewritten since the index was (another size) is counted afresh.
        count = entry["samples"] if entry and entry.get("bytes") == size else _count(path)
        shards.append(Shard(path, count))
    return ShardList(data, tuple(shards), tuple(classes))


def read_index(folder: Path) -> dict[str, Any]:
    """``folder/classes.json``: the class names and each shard's entry; one line if bad."""
    path = folder / CLASSES_FILE
    if not path.is_file():
        raise MobileNetError(
            f"no {CLASSES_FILE} in {folder} (the class list `mobilenet shards` writes)"
        )
    try:
        index = json.loads(path.read_text())
        classes, shards = index["classes"], index.get("shards", {})
        ok = isinstance(classes, list) and all(isinstance(c, str) for c in classes)
        if not ok or not classes or not isinstance(shards, dict):
            raise ValueError("no list of class names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MobileNetError(f"{path} is not a shard index: {e}") from None
    return {"classes": classes, "shards": shards}


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _members(path: Path) -> Iterator[tuple[str, list[tarfile.TarInfo], tarfile.TarFile]]:
    """The samples of a shard as (key, its members), in file order; data is not read."""
    try:
        with tarfile.open(path, "r:") as tar:
            key, members = None, []
            for member in tar:
                if not member.isfile():
                    continue
                k, _ = _split_name(member.name)
                if k != key and members:
                    yield key, members, tar
                    members = []
                key = k
                members.append(member)
            if members:
                yield key, members, tar
    except tarfile.TarError as e:
        raise MobileNetError(f"{path} is not a readable tar file: {e}") from None


def _count(path: Path) -> int:
    return sum(1 for _ in _members(path))


# --------------------------------------------------------------------------- decoding


def _label(cls: bytes | None, labels: list[int], shard: Path, key: str) -> int | None:
    """The model's class index of a sample from its ``.cls`` bytes; None when there are
    none or they are not an integer. A stored index outside the shards' classes is
    refused: Python would take -1 as the last class, and the scores would be wrong
    without a word."""
    if cls is None:
        return None
    try:
        stored = int(cls.decode().strip())
    except (ValueError, UnicodeDecodeError):
        return None
    if not 0 <= stored < len(labels):
        raise MobileNetError(
            f"{shard}: sample {key} has class {stored}, not one of the {len(labels)} classes "
            f"of its {CLASSES_FILE} (0 to {len(labels) - 1})"
        )
    return labels[stored]


Sample = tuple[Path, str, dict[str, bytes]]  # (shard, key, encoded parts by extension)


def _decode(sample: Sample, labels: list[int]) -> tuple[Image.Image, int] | None:
    """(RGB image, class index) of a sample; None when it has no decodable image or class."""
    shard, key, parts = sample
    label = _label(parts.get("cls"), labels, shard, key)
    if label is None:
        return None
    try:
        data = next(v for k, v in parts.items() if k in _IMAGE_EXTS)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image), label
    except (*DECODE_ERRORS, StopIteration):
        return None


def _read(members: list[tarfile.TarInfo], tar: tarfile.TarFile) -> dict[str, bytes]:
    parts = {}
    for member in members:
        f = tar.extractfile(member)
        if f is not None:
            parts[_split_name(member.name)[1]] = f.read()
    return parts


# --------------------------------------------------------------------------- training


class ShardStream(IterableDataset):
    """Training samples streamed from tar shards, (image, class index), split across
    processes and DataLoader workers.

    Epoch ``e`` permutes the shards with ``(seed, e)`` and concatenates them into one
    stream; process ``r`` of ``w`` takes its contiguous ``len(self)`` samples of it
    (``samples // w``: every process the same count, the remainder left out, since the
    engine derives its steps from it and DistributedDataParallel needs every process to
    take as many steps). Inside a process each worker takes whole batches of
    ``batch_size // w`` samples, so the workers' batches add up to exactly
    ``len(self) // (batch_size // w)``. Each worker shuffles its part within a buffer,
    seeded with ``(seed, e, rank, worker)``: a resumed run sees the same order.

    The process's place comes from ``torch.distributed`` (torchrun), else the ``RANK`` and
    ``WORLD_SIZE`` variables, else ``rank``/``world_size`` given here (tests).
    """

    def __init__(
        self,
        shards: ShardList,
        transform: Transform | None = None,
        *,
        seed: int = 0,
        batch_size: int = 1,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        classes: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.shards = shards.shards
        self.source = shards.source
        self.classes = list(classes if classes is not None else shards.classes)
        self.labels = shards.label_map(self.classes)
        self.samples = shards.samples
        self.transform = transform
        self.seed, self.batch_size, self.shuffle_buffer = seed, batch_size, shuffle_buffer
        self.epoch = 0
        self._given = (rank, world_size)
        self._place: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # Fixed in the training process: workers (forked or spawned) inherit it.
        self._place = self.place()

    def place(self) -> tuple[int, int]:
        """(rank, world size) of this process."""
        if self._place is not None:
            return self._place
        rank, world = self._given
        if rank is not None and world is not None:
            return rank, world
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        try:
            return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise MobileNetError("RANK and WORLD_SIZE must be integers") from None

    def __len__(self) -> int:
        return self.samples // self.place()[1]

    def plan(self, worker: int = 0, workers: int = 1) -> list[tuple[Shard, int, int]]:
        """What this process's ``worker`` reads this epoch: (shard, skip, take) in order."""
        rank, world = self.place()
        per_process = self.samples // world
        batch = max(1, self.batch_size // world)
        batches = per_process // batch
        begin = rank * per_process + worker * batches // workers * batch
        end = rank * per_process + (worker + 1) * batches // workers * batch
        if worker == workers - 1:
            end = (rank + 1) * per_process  # the partial batch, dropped by the loader
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        plan, offset = [], 0
        for i in order:
            shard = self.shards[i]
            lo, hi = max(begin, offset), min(end, offset + shard.samples)
            if lo < hi:
                plan.append((shard, lo - offset, hi - lo))
            offset += shard.samples
        return plan

    def _raw(self, plan: list[tuple[Shard, int, int]]) -> Iterator[Sample | None]:
        """The planned samples, encoded; None for each one a shard lacks."""
        for shard, skip, take in plan:
            got = 0
            for i, (key, members, tar) in enumerate(_members(shard.path)):
                if i >= skip + take:
                    break
                if i >= skip:
                    got += 1
                    yield shard.path, key, _read(members, tar)
            yield from [None] * (take - got)  # a shard shorter than its index says

    def _shuffled(self, items: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        """A shuffle buffer that starts small and grows to ``shuffle_buffer``, so the
        first batch does not wait for the whole buffer to fill."""
        buffer: list[Any] = []
        size, initial = max(1, self.shuffle_buffer), min(100, max(1, self.shuffle_buffer))
        for item in items:
            buffer.append(item)
            if len(buffer) < size and (more := next(items, _END)) is not _END:
                buffer.append(more)
            if len(buffer) >= initial:
                j = rng.integers(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, _ = self.place()
        plan = self.plan(worker, workers)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker])
        # A sample that does not decode (or that a shard lacks) is replaced by the next
        # good one, or the last: skipping it would leave this process short of the
        # others, and DistributedDataParallel waits for every process at every step.
        bad = pending = 0
        last = None
        for sample in self._shuffled(self._raw(plan), rng):
            decoded = _decode(sample, self.labels) if sample is not None else None
            if decoded is None:
                bad, pending = bad + 1, pending + 1
                continue
            for _ in range(1 + pending):
                yield self._sample(decoded)
            last, pending = decoded, 0
        if pending:
            if last is None:
                raise MobileNetError(f"{self.source}: no decodable sample in a whole part")
            for _ in range(pending):
                yield self._sample(last)
        if bad:
            names = ", ".join(dict.fromkeys(s.path.name for s, _, _ in plan))
            warnings.warn(
                f"{bad} sample(s) of {names} missing or not decodable, replaced by others "
                "(rewrite the shards with `mobilenet shards`)",
                stacklevel=2,
            )

    def _sample(self, decoded: tuple[Image.Image, int]) -> tuple[Any, int]:
        image, label = decoded
        return (self.transform(image) if self.transform else image), label


# --------------------------------------------------------------------------- evaluation


class ShardImages(Dataset):
    """Tar shards as a map-style dataset: (image, class index) by index.

    For evaluation: the evaluation sampler gives each process every ``world_size``-th
    index, so every image is evaluated exactly once across processes, as with folders.
    Opening reads the tar headers once (no image data); an image is then one seek and
    one read.
    """

    def __init__(
        self,
        shards: ShardList,
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.source = shards.source
        self.classes = list(classes if classes is not None else shards.classes)
        labels = shards.label_map(self.classes)
        self.paths = [s.path for s in shards.shards]
        rows = []  # (shard, offset, size, class index) of each image
        for n, shard in enumerate(shards.shards):
            for key, members, tar in _members(shard.path):
                found = {_split_name(m.name)[1]: m for m in members}
                image = next((m for ext, m in found.items() if ext in _IMAGE_EXTS), None)
                cls = _read([found["cls"]], tar)["cls"] if "cls" in found else None
                label = _label(cls, labels, shard.path, key)
                if image is None or label is None:
                    raise MobileNetError(
                        f"{shard.path}: sample {key} lacks an image or a valid class (.cls)"
                    )
                rows.append((n, image.offset_data, image.size, label))
        if not rows:
            raise MobileNetError(f"no samples in {self.source}")
        table = np.array(rows, dtype=np.int64)  # one array: cheap to share with workers
        self.shard, self.offset, self.size = table[:, 0], table[:, 1], table[:, 2]
        self.targets = table[:, 3].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path = self.paths[self.shard[i]]
        with path.open("rb") as f:
            f.seek(int(self.offset[i]))
            data = f.read(int(self.size[i]))
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                rgb = to_rgb(image)
        except (UnidentifiedImageError, *DECODE_ERRORS) as e:
            raise MobileNetError(f"{path}: image {i} does not decode ({e})") from None
        target = self.targets[i]
        return (self.transform(rgb) if self.transform else rgb), target
