"""Whether this CPU's ONNX Runtime int8 kernels compute what an int8 ONNX file says.

An int8 QDQ file states its arithmetic: every tensor quantized and dequantized at given
scales and zero points, the operators between them in float32. ONNX Runtime fuses those
pairs into int8 kernels, and on x86 CPUs without VNNI its uint8 x int8 kernels multiply
with ``VPMADDUBSW``, whose 16-bit sums saturate (ONNX Runtime's quantization guide warns
of it and advises 7-bit weights or uint8 weights). The same file then gives other logits
on such a CPU than on one with VNNI, by an amount that depends on the weights: measured
on a 2-core AMD EPYC with AVX2 only, the committed legacy V3-Small int8 file (written on
a Xeon with AVX-512 VNNI) is 0.99 of its logits' spread (RMS) from its own QDQ graph on
smooth random images, 13x that network's rounding noise, and ranks other classes first.

So an int8 file is checked on the CPU that runs it: its int8 kernels against the same
file run as written, each quantize/dequantize pair in float32
(:func:`~mobilenet.export.onnx.onnx_session` with ``qdq_in_float``), by the rule of
:mod:`mobilenet.export.int8_check` (the file's own rounding noise measured on the QDQ
graph). Where they disagree, ``eval`` and ``predict`` run the QDQ graph in float32 (the
file's own arithmetic, slower) and say so in one line; ``quantize`` says so when it
writes a file its own CPU cannot run in int8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .int8_check import Int8Agreement, int8_agreement, probe_sensitivity
from .onnx import onnx_session

__all__ = ["PROBE_IMAGES", "kernel_agreement", "probe_images", "runnable_int8_session"]

PROBE_IMAGES = 3  # run as a batch of 1 and one of 3, as the exporters' check does
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def probe_images(
    size: tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Seeded smooth random images of ``size``, normalised with ``mean`` and ``std``: no
    data is at hand where a file is loaded, and smooth images drive a network's activations
    over ranges like real ones (white noise would not)."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(PROBE_IMAGES, 3, 6, 6, generator=generator)
    pixels = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    shift = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - shift) / scale


def _runner(session) -> Callable[[torch.Tensor], torch.Tensor]:
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.contiguous().numpy()})[0])

    return run


def kernel_agreement(
    int8_session, qdq_session, images: torch.Tensor, scores: bool = True
) -> Int8Agreement:
    """How far ``int8_session`` (ONNX Runtime's int8 kernels) is from ``qdq_session`` (the
    same file's QDQ graph in float32) on ``images``, in units of the output's spread, with
    the noise the rule allows (the QDQ graph's own sensitivity to one-step changes);
    ``scores``: whether its output channels are class scores (not an encoder's features)."""
    ours_run, theirs_run = _runner(int8_session), _runner(qdq_session)
    batches = (images[:1], images[:PROBE_IMAGES])
    theirs = torch.cat([theirs_run(x) for x in batches])
    ours = torch.cat([ours_run(x) for x in batches])
    sensitivity = probe_sensitivity(theirs_run, batches[1], theirs[1:])
    return int8_agreement(ours, theirs, theirs, sensitivity, scores=scores)


def runnable_int8_session(
    path: str | Path,
    session,
    size: tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    warn: Callable[[str], None] | None = None,
    scores: bool = True,
):
    """``session`` (an int8 file's, on ONNX Runtime's int8 kernels) where this CPU's
    kernels compute the file's arithmetic; else a session of its QDQ graph in float32,
    after one line to ``warn`` saying why. ``scores``: see :func:`kernel_agreement`."""
    qdq = onnx_session(path, qdq_in_float=True)
    agreement = kernel_agreement(session, qdq, probe_images(size, mean, std), scores)
    if agreement.refusal("ONNX Runtime") is None:
        return session
    if warn is not None:
        from ..machine import cpu

        times = agreement.error / agreement.noise
        why = (
            ""
            if any("VNNI" in isa for isa in cpu()["isa"])
            else ("; uint8 x int8 products saturate on x86 without VNNI")
        )
        warn(
            f"{path}: this CPU's ONNX Runtime int8 kernels are {agreement.error:.2f} of "
            f"{agreement.spread_of} spread from the file's quantized graph ({times:.0f}x its "
            f"rounding noise{why}): running its QDQ graph in float32 instead, the same int8 model, "
            "slower"
        )
    return qdq
