"""Whether an int8 file computes what its quantization means: the check the int8 exporters
(ExecuTorch, LiteRT, OpenVINO) run before a byte is written, and the one an int8 ONNX file
meets on the CPU that runs it (:mod:`mobilenet.export.onnx_int8`).

An int8 file is the lowering of a quantized PyTorch *reference*: the PT2E graph the
exporter calibrated, with the same weights, scales and zero points. The file's kernels
are not the reference's: they requantize with fixed-point multipliers, round halves
another way, fuse an activation or a mean, and each of those moves an activation by one
quantization step here and there. Over fifty layers those steps compound, by how much
depends on the network, not on the conversion: random mobilenet_v2 and mobilenet_v3_small
(what the tests export) turn them into logits 20% to 100% of their spread away, random
mobilenet_v4_conv_small 6% to 27%. A maximum absolute difference
is one logit decided by that rounding: the reference's own from the float model measured
1.7e1 on one AMD EPYC and 3.3e1 on another (mobilenet_v3_small, the same images). So the
file is held to the rounding noise *of this network*, measured on the reference.

The rule (:func:`check_int8`, on the calibration images run as batches of 1 and 3), every
distance the root mean square of a difference of logits divided by the standard deviation
of the float model's logits (their *spread*):

* *error*: the file's distance from the reference;
* *noise*: how far rounding moves this network's logits, the largest of the reference's
  distance from the float model (its own rounding of every activation), its distance
  from itself on the images moved by up to half an 8-bit step (:func:`probe_sensitivity`:
  how far one-step changes compound here) and :data:`NOISE_FLOOR`;
* accepted when error <= ``slack`` x noise (:data:`SLACK`, 3: the *allowed* error), and on
  every image the file's first class is one the reference scores within twice the allowed
  error of its own first (a choice rounding could flip: a flip needs two logits to move).

A map (``[N, C, H, W]``: a segmentation model's logits, an encoder's features) is judged
alike, each position a row of ``C`` values, the spread that of the whole float map. A
model without classes (:func:`class_scores`: MobileNetV5's encoder, whose 2048 channels
are features) has no first class to keep: its file is held to the distance alone.

Measured on those three random networks (64x64, width 0.5, calibrated on digits; the
PT2E references of both exporters, three seeds, four sets of images): the real files are
0.6x to 1.4x the noise from their reference. The reference with 2%, 10% or 30% of every
layer's activations moved one step at random (other kernels' rounding, the last far more
of it than any) is at most 1.4x, 1.8x and 2.6x, its first class within 1.6x the allowed
error. Wrong conversions (one activation a quarter, half or three quarters of the way
through read at twice or half its scale, as uint8, with its channel halves exchanged, or
zeroed; the output's scale doubled or its zero point 20 steps off; the classes permuted)
measure 2x to 30x the noise in mobilenet_v4_conv_small, refused 274 times in 288
(weights 3 steps off at random everywhere: 17 in 24). In random mobilenet_v3_small they
measure 0.4x to 15x, refused 173 times in 396 (classes permuted: 34 in 36); in random
mobilenet_v2, whose int8 logits are 30% to 100% of their spread from the float ones,
rounding hides nearly all of them (16 in 288). The rule refuses what the network's own
rounding cannot hide, and nothing that rounding explains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MobileNetError
from .check import class_scores

__all__ = [
    "NOISE_FLOOR",
    "PROBE_DRAWS",
    "SLACK",
    "Int8Agreement",
    "check_int8",
    "int8_agreement",
    "probe_sensitivity",
]

SLACK = 3.0  # how many times the network's rounding noise the file may be from its reference
NOISE_FLOOR = 0.01  # of the logits' spread: below it, no difference changes what a model says
PROBE_DRAWS = 4  # draws of the moved images, averaged: one draw may move few roundings

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Int8Agreement:
    """What :func:`check_int8` measured; distances in units of the float logits' spread
    (their standard deviation)."""

    error: float  # RMS of (file - reference) logits
    noise: float  # the network's rounding noise (see the module's docstring)
    slack: float
    top1_gap: float  # largest reference score gap from its top-1 to the file's top-1
    top1_image: int  # the calibration image of that gap
    top1_class: int  # the file's top-1 class there
    max_abs_diff: float  # the file's max abs difference from the float model, in logits
    spread_of: str = "the logits'"  # what the distances are in units of, for messages

    @property
    def allowed(self) -> float:
        return self.slack * self.noise

    def refusal(self, engine: str, reference: str = "its PyTorch int8 reference") -> str | None:
        """The one-line reason ``engine``'s int8 file is refused, or None; ``reference``
        names what it was compared with."""
        if not self.error <= self.allowed:  # also refuses NaN
            return (
                f"{engine} int8 is {self.error:.3f} of {self.spread_of} spread (RMS) from "
                f"{reference} on the calibration images, more than {self.allowed:.3f} "
                f"({self.slack:g}x this network's rounding noise, {self.noise:.3f}); "
                "nothing written"
            )
        if not self.top1_gap <= 2 * self.allowed:
            return (
                f"{engine} int8 ranks class {self.top1_class} first on calibration image "
                f"{self.top1_image + 1}, which {reference} scores "
                f"{self.top1_gap:.3f} of {self.spread_of} spread below its own first, more than "
                f"{2 * self.allowed:.3f} (twice the allowed error); nothing written"
            )
        return None


def int8_agreement(
    file_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    float_logits: torch.Tensor,
    sensitivity: float = 0.0,
    slack: float = SLACK,
    scores: bool = True,
) -> Int8Agreement:
    """The rule's measurements on outputs already computed on the same images: the int8
    file's, its reference's and the float model's logits (rows: images, columns:
    classes), or maps (``[N, C, H, W]``: every position a row). ``sensitivity`` is the RMS
    distance of the reference's outputs from themselves on the images moved by half a step
    (what :func:`check_int8` measures), in the output's units. ``scores``: whether the
    channels are class scores (:func:`class_scores`); an encoder's features have no first
    class to keep, and are held to the distance alone."""
    images = file_logits.shape[0]
    ours, theirs, exact = (
        _rows(t.detach().to(torch.float64)) for t in (file_logits, reference_logits, float_logits)
    )
    spread = float(exact.std()) if exact.numel() > 1 else 0.0
    spread = max(spread, 1e-6 * max(1.0, float(exact.abs().max())))  # constant logits

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).pow(2).mean().sqrt()) / spread

    noise = max(distance(theirs, exact), sensitivity / spread, NOISE_FLOOR)
    if math.isnan(distance(theirs, exact)) or math.isnan(sensitivity):
        noise = math.nan  # max() would drop a NaN that comes second
    top1 = ours.argmax(1)
    gaps = (theirs.max(1).values - theirs.gather(1, top1[:, None])[:, 0]) / spread
    if not scores:
        gaps = torch.zeros_like(gaps)
    worst = int(gaps.argmax())
    return Int8Agreement(
        error=distance(ours, theirs),
        noise=noise,
        slack=slack,
        top1_gap=float(gaps[worst]),
        top1_image=worst // max(1, len(ours) // max(1, images)),
        top1_class=int(top1[worst]),
        max_abs_diff=float((ours - exact).abs().max()),
        spread_of="the logits'" if scores else "the output's",
    )


def _rows(output: torch.Tensor) -> torch.Tensor:
    """Logits as they are; a map ``[N, C, H, W]`` as one row of ``C`` per position."""
    if output.dim() <= 2:
        return output
    return output.movedim(1, -1).reshape(-1, output.shape[1])


def check_int8(
    run: Runner,
    model: nn.Module,
    reference: nn.Module,
    images: torch.Tensor,
    engine: str,
    slack: float = SLACK,
    reference_name: str = "its PyTorch int8 reference",
) -> float:
    """Compare ``run`` (the int8 file's runner) with ``reference`` (the quantized PyTorch
    model it was lowered from) and ``model`` (the float one) on ``images`` (calibration
    images, run as batches of 1 and up to 3), by the rule of the module's docstring; a
    refusal is one :class:`MobileNetError` line naming ``engine`` and ending "nothing
    written". Returns the file's max abs difference from the float model (what the
    command reports)."""
    batches = (images[:1], images[:3])
    with torch.no_grad():
        exact = torch.cat([model(x) for x in batches])
        theirs = torch.cat([reference(x) for x in batches])
        sensitivity = probe_sensitivity(reference, batches[1], theirs[1:])
    # Copied at once: a runtime may hand out its output buffer, which the next run reuses.
    ours = torch.cat([torch.as_tensor(run(x)).detach().clone() for x in batches])
    if ours.shape != theirs.shape:
        raise MobileNetError(
            f"{engine} int8 gives logits of shape {tuple(ours.shape)} where {reference_name} "
            f"gives {tuple(theirs.shape)}; nothing written"
        )
    agreement = int8_agreement(ours, theirs, exact, sensitivity, slack, class_scores(model))
    reason = agreement.refusal(engine, reference_name)
    if reason:
        raise MobileNetError(reason)
    return agreement.max_abs_diff


def probe_sensitivity(reference: nn.Module, images: torch.Tensor, logits: torch.Tensor) -> float:
    """How far rounding differences compound through ``reference``: the mean RMS distance
    of its logits on ``images`` moved at random by up to half an 8-bit step of each
    image's range from ``logits`` (its own on ``images``), over :data:`PROBE_DRAWS` draws.
    Moving the input by half a step changes the rounding of some of its int8 values by
    one step, as another CPU's kernels do inside the network. Seeded: a network is
    measured the same way every time."""
    generator = torch.Generator().manual_seed(0)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    step = (images.amax(dim=(1, 2, 3), keepdim=True) - low) / 255
    total = 0.0
    with torch.no_grad():
        for _ in range(PROBE_DRAWS):
            moved = images + (torch.rand(images.shape, generator=generator) - 0.5) * step
            difference = reference(moved).double() - logits.double()
            total += float(difference.pow(2).mean().sqrt())
    return total / PROBE_DRAWS
