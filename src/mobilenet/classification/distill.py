"""Knowledge distillation: a trained classifier (the teacher) teaches the one being trained
(the student).

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015): the
student matches the teacher's class probabilities softened by a temperature ``T``,

    kd = T^2 * KL(softmax(teacher / T) || softmax(student / T)),

the ``T^2`` keeping the gradient's scale independent of ``T`` (Section 2), mixed with the
task's own loss as ``(1 - alpha) * task + alpha * kd`` (the recipe's ``kd_alpha`` and
``kd_temperature``). Feature distillation (Romero et al., "FitNets", 2015) adds a
regression of the teacher's last feature map from the student's, through a learned 1x1
convolution (:class:`FeatureDistilled`).

The teacher is any file ``mobilenet eval`` reads (:func:`load_teacher`): our safetensors,
torchvision, timm or Keras weights, or an exported model run by its own engine (ONNX
Runtime, ``torch.export``). It sees the student's batches, converted to its own
preprocessing and input size; it is never trained, and it is no part of the student
module, so neither the optimizer, the EMA nor the saved weights ever see it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.imagenet import folder_classes
from ..data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ..deployed import Trained
from ..errors import MobileNetError
from ..models import MobileNet, ModelConfig
from ..models.base import DeployedModel, EvalConfig
from ..models.pretrained import resolve_weights
from .predict import load_trained

__all__ = [
    "FeatureDistilled",
    "Teacher",
    "check_kd",
    "distillation_loss",
    "feature_channels",
    "kd_loss",
    "load_teacher",
]


def check_kd(alpha: float, temperature: float) -> None:
    """Refuse a distillation share outside [0, 1] or a temperature that is not a finite
    number above 0, in one line naming the flag."""
    if not 0 <= alpha <= 1:  # also refuses NaN
        raise MobileNetError(f"--kd-alpha {alpha}: the distillation share must lie in [0, 1]")
    if not (math.isfinite(temperature) and temperature > 0):
        raise MobileNetError(
            f"--kd-temperature {temperature}: the softmax temperature must be a finite "
            "number above 0"
        )


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over
    the batch. Its gradient in the student's logits is ``T * (softmax(s / T) -
    softmax(t / T)) / batch``; the teacher's logits are a target, never differentiated.
    Computed in float32 whatever the autocast precision of the logits."""
    if student_logits.shape != teacher_logits.shape:
        raise MobileNetError(
            f"the student's logits {tuple(student_logits.shape)} and the teacher's "
            f"{tuple(teacher_logits.shape)} differ: distillation needs the same classes"
        )
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=1)
    teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


def distillation_loss(
    task_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """``(1 - alpha) * task_loss + alpha * kd_loss``: alpha 0 is the task alone, 1 the
    teacher alone."""
    return (1 - alpha) * task_loss + alpha * kd_loss(student_logits, teacher_logits, temperature)


class Teacher:
    """A trained classifier that gives the logits of the student's batches, frozen.

    The model is kept in eval mode with ``requires_grad`` off and runs under
    ``torch.no_grad()``. ``mean`` and ``std`` are the student's normalisation: where the
    teacher's own (its file's preprocessing) or its input size differ, a batch is
    un-normalised, resized to the teacher's size (bilinear, antialiased) and normalised
    as the teacher's. A PyTorch teacher runs on ``device``; an exported one on its own
    engine (on the CPU), its logits brought back to the batch's device.

    ``seconds`` is the wall time spent in the teacher (CUDA synchronised, so the figure
    is the teacher's), ``calls`` the batches it was given.
    """

    def __init__(
        self,
        trained: Trained,
        device: torch.device,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.trained = trained
        self.name = str(trained.path or "the teacher")
        self.exported = isinstance(trained.model, DeployedModel)
        self.device = torch.device("cpu") if self.exported else torch.device(device)
        model = trained.model if self.exported else trained.model.to(self.device)
        self.model = model.eval().requires_grad_(False)
        own = trained.eval_preprocess()
        self.size = trained.size
        self.same_normalisation = tuple(own.mean) == tuple(mean) and tuple(own.std) == tuple(std)
        stats = (mean, std, own.mean, own.std)
        self.student_mean, self.student_std, self.mean, self.std = (
            torch.tensor(s, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) for s in stats
        )
        self.seconds = 0.0
        self.calls = 0

    def __repr__(self) -> str:
        return f"Teacher({self.name}, {len(self.trained.classes)} classes, {self.size})"

    @property
    def classes(self) -> list[str]:
        return self.trained.classes

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 logits for a batch of student-preprocessed images, on the
        batch's device."""
        return self._timed(images, lambda x: (self.model(x).float(),))[0]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's last feature map (``forward_features``, before pooling) for a
        batch of student-preprocessed images."""
        self.require_module()
        return self._timed(images, lambda x: (self.model.forward_features(x),))[0]

    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both, from one forward: ``(logits, feature map)``."""
        self.require_module()

        def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.model.forward_features(x)
            return self.model.forward_head(features).float(), features

        logits, features = self._timed(images, both)
        return logits, features

    def require_module(self) -> None:
        """Refuse, in one line, an exported teacher where its feature map is needed."""
        if self.exported:
            raise MobileNetError(
                f"feature distillation needs a PyTorch teacher: --teacher {self.name} runs "
                f"on its own engine ({getattr(self.model, 'engine', 'exported')})"
            )

    def _timed(
        self, images: torch.Tensor, run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """``run`` on the converted batch, without gradients, timed and counted; what it
        returns brought to the batch's device."""
        start = time.perf_counter()
        if self.model.training:  # switched by someone: the teacher stays as loaded
            self.model.eval()
        with torch.no_grad():
            out = tuple(o.to(images.device) for o in run(self.convert(images)))
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def convert(self, images: torch.Tensor) -> torch.Tensor:
        """Student-preprocessed images as the teacher takes them: its normalisation, its
        input size, its device (float32 contiguous for an exported engine)."""
        x = images.detach().to(self.device)
        resize = tuple(x.shape[-2:]) != self.size
        if self.same_normalisation and not resize:
            return x.float().contiguous() if self.exported else x
        x = x.float() * self.student_std + self.student_mean  # pixels in [0, 1]
        if resize:
            x = F.interpolate(x, self.size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return x.contiguous() if self.exported else x


def load_teacher(
    weights: str,
    model: str | None,
    num_classes: int,
    classes: list[str] | None,
    device: torch.device,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Teacher:
    """The teacher of ``--teacher`` (``model``: ``--teacher-model``, for weights that do
    not name their architecture), checked against the data: a classifier of the data's
    ``num_classes`` classes, with the data's ``classes`` in the data's order where its
    file names them (a teacher that numbers the classes otherwise would teach wrong labels
    without a sign). ``mean``, ``std``: the student's normalisation. Every refusal is one
    :class:`~mobilenet.errors.MobileNetError` line naming the teacher and ``--teacher``."""
    trained = _load(weights, model)
    if trained.task != "classification":
        raise MobileNetError(f"--teacher {weights} holds a {trained.task} model, not a classifier")
    if len(trained.classes) != num_classes:
        raise MobileNetError(
            f"--teacher {weights} has {len(trained.classes)} classes; the data has {num_classes}"
        )
    named = trained.card is not None and bool(trained.card.classes)
    if classes is not None and named:
        check_same_classes(weights, trained.classes, classes)
    return Teacher(trained, device, mean, std)


def _load(weights: str, model: str | None) -> Trained:
    """The teacher file read by :func:`load_trained`, its refusals said of ``--teacher``."""
    where = str(Path(weights))  # how the readers name the file in their messages
    try:
        path = resolve_weights(weights)  # an official key or a URL: the local file
        where = str(path)
        if path.is_dir():
            raise MobileNetError(f"{path} is a folder, not a model file")
        if not path.exists():
            raise MobileNetError(f"{path}: no such file")
        return load_trained(where, model)
    except MobileNetError as e:
        raise MobileNetError(_teacher_line(str(e), weights, where)) from None


def _teacher_line(message: str, weights: str, path: str) -> str:
    """A reader's refusal as said of the teacher: ``--teacher FILE ...`` once, and the
    teacher's architecture flag where the reader asks for ``--model``."""
    line = message.replace("pass --model", "pass --teacher-model").splitlines()[0]
    if line.startswith(path):
        return f"--teacher {weights}{line[len(path) :]}"
    return f"--teacher {weights}: {line}"


def check_same_classes(weights: str, teacher: Sequence[str], data: Sequence[str]) -> None:
    """Refuse a teacher whose class names differ from the data's, naming the first
    mismatch (ImageNet's names and WordNet ids count as the same classes)."""
    if len(data) != len(teacher):
        raise MobileNetError(
            f"--teacher {weights} has {len(teacher)} classes; the data has {len(data)}"
        )
    ours, theirs = folder_classes(list(data)), folder_classes(list(teacher))
    for index, (mine, its) in enumerate(zip(ours, theirs, strict=False)):
        if mine != its:
            raise MobileNetError(
                f"--teacher {weights} numbers its classes otherwise than the data: class "
                f"{index} is {its!r} to the teacher, {mine!r} in the data"
            )


def feature_channels(model: nn.Module | Teacher, resolution: int = 224) -> int:
    """The channels of the last feature map of a model or a teacher: its ``feature_info``,
    else one forward of a blank ``resolution`` image (a teacher: of its own size)."""
    if isinstance(model, Teacher):
        model.require_module()
        size, net = model.size, model.model
    else:
        size, net = (resolution, resolution), model
    info = getattr(net, "feature_info", None)
    if info:
        return info[-1].channels
    if not hasattr(net, "forward_features"):
        raise MobileNetError(f"{type(net).__name__} has no forward_features: no feature map")
    param = next(net.parameters(), None)
    blank = torch.zeros(1, 3, *size, device=param.device if param is not None else "cpu")
    training = net.training
    net.eval()  # BatchNorm's statistics stay as they are
    try:
        with torch.no_grad():
            return int(net.forward_features(blank).shape[1])
    finally:
        net.train(training)


class FeatureDistilled(nn.Module):
    """A student with a 1x1 convolution that maps its last feature map to the teacher's
    channels (FitNets' regressor), learned with it.

    In eval mode ``forward`` is the student's: its logits, so evaluation sees the student
    alone (save ``.student``: the projection is only a training aid). In train mode it
    returns ``(logits, projected_features)``; :meth:`feature_loss` compares the latter
    with the teacher's map (:meth:`Teacher.features`)."""

    def __init__(
        self, student: MobileNet, teacher_channels: int, student_channels: int | None = None
    ) -> None:
        super().__init__()
        channels = student_channels or feature_channels(student)
        self.student = student
        self.projection = nn.Conv2d(channels, teacher_channels, 1)
        self.teacher_channels = teacher_channels

    @property
    def config(self) -> ModelConfig:
        return self.student.config

    @property
    def num_classes(self) -> int:
        return self.student.num_classes

    @property
    def eval_config(self) -> EvalConfig:
        return self.student.eval_config

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return self.student(x)
        features = self.student.forward_features(x)
        return self.student.forward_head(features), self.projection(features)

    def feature_loss(self, projected: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """Mean squared error between the projected student map and the teacher's, the
        teacher's average-pooled to the student's spatial size (float32)."""
        if teacher_features.shape[1] != projected.shape[1]:
            raise MobileNetError(
                f"the teacher's feature map has {teacher_features.shape[1]} channels; the "
                f"projection gives {projected.shape[1]}"
            )
        target = teacher_features.detach().float()
        if target.shape[-2:] != projected.shape[-2:]:
            target = F.adaptive_avg_pool2d(target, projected.shape[-2:])
        return F.mse_loss(projected.float(), target)
