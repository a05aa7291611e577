"""``mobilenet export|quantize`` for encoders (found by :mod:`.tasks`): models whose output
is a feature map, not class scores (MobileNetV5-300M as Gemma 3n uses it, whose
``forward`` is the 16x16x2048 fusion-adapter map).

An encoder's files say ``task: encoder`` in their card. ``train``, ``eval`` and
``predict`` have nothing to score or name in a feature map: they refuse one in one line.
"""

from __future__ import annotations

import argparse

from ..deployed import Trained
from ..errors import MobileNetError
from ..formats import Format, format_of
from ..limits import check_memory
from .tasks import EXPORT_CHECK, TaskCommands

__all__ = ["COMMANDS", "EncoderCommands", "load_encoder"]

_NOTHING_TO_SCORE = (
    "{what} is an encoder: its output is a feature map, not class scores; {command} takes "
    "classifiers, detectors and segmentation models"
)


class EncoderCommands(TaskCommands):
    name = "encoder"
    quantizes = True
    square_input = "an encoder's file takes a square input: --resolution N"

    def refusal(self, command: str, args: argparse.Namespace) -> str:
        model, weights = getattr(args, "model", None), getattr(args, "weights", None)
        if command == "train":
            return (
                f"{model or weights} is an encoder: it has no loss of its own to train; "
                "train the model it serves, or a classifier"
            )
        return _NOTHING_TO_SCORE.format(what=weights or model, command=command)

    def trained_for_export(self, args: argparse.Namespace, fmt: Format):
        """The encoder of ``--weights`` at ``--resolution`` (else its own evaluation size)
        and its card: task ``encoder``, no classes, its preprocessing."""
        trained = load_encoder(args.weights, args.model, args.width_mult, args.resolution)
        check_memory(trained.model, trained.resolution, *EXPORT_CHECK)
        return trained.model, trained.resolution, trained.model_card()

    def random_for_export(self, args: argparse.Namespace, fmt: Format):
        """A randomly initialised encoder; its card keeps our preprocessing."""
        from ..data.published import model_preprocess

        model, resolution, card = super().random_for_export(args, fmt)
        if fmt.keeps_metadata:
            card = card.replace(preprocess=model_preprocess(model, resolution))
        return model, resolution, card

    def trained_for_quantize(self, args: argparse.Namespace) -> Trained:
        return load_encoder(args.weights, args.model)


def load_encoder(
    weights: str,
    model: str | None = None,
    width_mult: float | None = None,
    resolution: int | None = None,
) -> Trained:
    """The float encoder a checkpoint holds (ours, timm's or Gemma 3n's: ``model`` names it
    where the file does not), at ``resolution`` (else the one its file names, else its
    evaluation size), with no
    classes; an exported file is refused (export and quantize start from float weights)."""
    from ..card import ModelCard
    from ..data.published import model_preprocess
    from ..models.pretrained import resolve_weights
    from ..models.registry import model_from_checkpoint
    from ..weights import read_checkpoint, saved_config

    path = resolve_weights(weights)
    if format_of(path) is not None:
        raise MobileNetError(f"{weights} is already exported: start from the float weights")
    state_dict, metadata = read_checkpoint(path)
    saved = saved_config(metadata)
    name = model or (saved["name"] if saved else None)
    if name is None:
        raise MobileNetError(f"{weights} does not say which model it holds: pass --model")
    kwargs = {} if width_mult is None else {"width_mult": width_mult}
    net = model_from_checkpoint(name, state_dict, metadata, str(path), **kwargs).eval()
    card = ModelCard.read(metadata, str(path))
    res = resolution or card.resolution or net.eval_config.resolution
    return Trained(net, [], res, path, model_preprocess(net, res), card)


COMMANDS = EncoderCommands()
