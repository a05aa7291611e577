"""Measured activation memory: the storages a forward pass really allocates.

:class:`PeakMemory` is a dispatch mode that sees every operator's output and a finaliser
that sees every storage freed; :func:`measure_peak` runs one call under it. Workspaces
private to a kernel (e.g. a convolution's reorder buffers) are below the operator level and
are not seen.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory", "measure_peak"]


class PeakMemory(TorchDispatchMode):
    """Observe the activation memory a computation really allocates.

    Every operator's output storage that is new is counted when it is made and uncounted
    when its finaliser runs (when the storage itself is freed, views included); ``peak``
    is the largest total alive at once. Storages alive before entering (the input, the
    weights) are not counted, nor are their views. Every allocation and free is logged in
    ``events`` (storage number, bytes), so that :meth:`peak_without` can replay the run
    leaving some storages out.
    """

    def __init__(self, exclude: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.events: list[tuple[int, int]] = []
        self._sizes: dict[int, tuple[int, int]] = {}  # data pointer -> (bytes, number)
        self._numbers = itertools.count()
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._sizes or key in self._excluded:
            return
        number = next(self._numbers)
        self._sizes[key] = (nbytes, number)
        self.events.append((number, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        nbytes, number = self._sizes.pop(key)
        self.events.append((number, -nbytes))
        self.live -= nbytes

    def numbers(self, tensors: Sequence[Tensor]) -> set[int]:
        """The numbers of the tracked storages alive now that hold ``tensors``."""
        keys = {t.untyped_storage().data_ptr() for t in tensors}
        return {self._sizes[k][1] for k in keys if k in self._sizes}

    def peak_without(self, numbers: set[int]) -> int:
        """The peak of the run replayed without the storages ``numbers``."""
        live = peak = 0
        for number, nbytes in self.events:
            if number not in numbers:
                live += nbytes
                peak = max(peak, live)
        return peak


def measure_peak(
    fn: Callable[..., Any],
    *inputs: Tensor,
    module: nn.Module | None = None,
    without_result: bool = False,
) -> int:
    """Peak bytes of the storages allocated while ``fn(*inputs)`` runs, its result included,
    the inputs and ``module``'s parameters and buffers excluded.

    ``without_result``: the result's storages (every tensor it holds) are left out too, as
    if the caller had allocated them beforehand: the memory the computation needs beyond
    its output. Where the peak falls before the result exists, the two figures agree."""
    exclude = list(inputs)
    if module is not None:
        exclude += [*module.parameters(), *module.buffers()]
    with PeakMemory(exclude) as tracker:
        out = fn(*inputs)
        result = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        numbers = tracker.numbers(result) if without_result else set()
        del out, result
    return tracker.peak_without(numbers) if without_result else tracker.peak
