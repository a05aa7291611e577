"""SSDLite: SSD with depthwise separable prediction layers on a MobileNet (V2 Section 6.2).

The V2 paper's detector: "we replace all the regular convolutions with separable
convolutions (depthwise followed by 1x1 projection) in SSD prediction layers". The first
feature map is the expansion layer of the first stride-32 block (V2: block 15's
expansion, output stride 16, 576 channels; V3: the C4 expansion of Section 6.3), the
second is the backbone's last 1x1 conv (stride 32); four extra layers (512, 256, 256,
128 channels, each 1x1 -> 3x3 depthwise stride 2 -> 1x1) add strides 64 to 512. At
320x320 the maps are 20x20, 10x10, 5x5, 3x3, 2x2 and 1x1, with six default boxes per
location: 3,234 boxes.

COCO test-dev (V2 Table 6): MNetV2 + SSDLite 22.1 mAP, 4.3M params, 0.8B MAdds;
MNetV1 + SSDLite 22.2 mAP, 5.1M, 1.3B; SSD300 23.2 mAP, 36.1M, 35.2B. V3 (Table 6 of
the V3 paper) uses the reduced tail (last stage's channels halved): V3-Large + SSDLite
22.0 mAP; torchvision's ``ssdlite320_mobilenet_v3_large``, which ours reproduces
exactly, counts 3,440,060 params and 21.3 COCO val mAP.

Interface (torchvision's detection convention): ``model(images)`` takes a list of
``[3, H, W]`` float images in [0, 1] (any sizes) or a batch tensor, normalises them and
resizes them to ``image_size``; in eval mode it returns one ``{"boxes", "scores",
"labels"}`` dict per image, boxes (x1, y1, x2, y2) in the image's own pixels; in
training mode ``model(images, targets)`` returns ``{"bbox_regression",
"classification"}`` losses. :meth:`SSDLite.forward_raw` is the network alone (a tensor
in, class logits and box offsets out): what ``cost`` traces and ONNX export writes.
Class 0 is the background: ``num_classes`` counts it (91 for COCO).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from ..blocks import InvertedResidual
from ..errors import MobileNetError
from ..layers import ConvBNAct, set_bn_eps
from ..models import mobilenet_v2, mobilenet_v3
from ..models.registry import check_width_mult, register_model
from .boxes import BoxCoder, DefaultBoxes
from .loss import LossConfig, ssd_loss

__all__ = [
    "DetectorConfig",
    "SSDLite",
    "ssdlite_mobilenet_v2",
    "ssdlite_mobilenet_v3_large",
    "ssdlite_mobilenet_v3_small",
]

EXTRA_CHANNELS = (512, 256, 256, 128)  # V2 Section 6.2: the four extra layers
MIN_EXTRA_CHANNELS = 16  # extra layers thinned by the width multiplier keep at least 16
Detections = list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild a detector; stored with its weights.

    The post-processing defaults are torchvision's for ``ssdlite320_mobilenet_v3_large``
    (its COCO evaluation settings): keep scores above 0.001, the 300 best boxes per class
    before NMS, NMS at IoU 0.55, and at most 300 detections per image. Images are mapped
    from [0, 1] to [-1, 1] (mean 0.5, std 0.5), as the TF and torchvision SSDLite do.
    """

    name: str
    width_mult: float = 1.0
    num_classes: int = 91  # with the background (class 0): COCO's 90 ids + 1
    image_size: int = 320
    min_scale: float = 0.2  # default box sizes, as fractions of the input: SSD's 0.2 ..
    max_scale: float = 0.95  # 0.95 over the feature maps (set them to the objects' sizes)
    bn_eps: float = 1e-3  # TF reference and torchvision: 1e-3 (momentum 0.03)
    score_thresh: float = 0.001
    nms_thresh: float = 0.55
    topk_candidates: int = 300
    detections_per_img: int = 300
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class ExtraLayer(nn.Module):
    """An SSDLite extra feature layer: 1x1 to half the channels -> 3x3 depthwise stride 2
    -> 1x1 to ``out_channels``, each with BatchNorm and ReLU6 (V2 Section 6.2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.stride = 2
        self.out_channels = out_channels
        self.reduce = ConvBNAct(in_channels, mid, 1)  # pw
        self.dw = ConvBNAct(mid, mid, 3, stride=2, groups=mid)  # dw
        self.expand = ConvBNAct(mid, out_channels, 1)  # pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.dw(self.reduce(x)))


class Predictor(nn.Module):
    """SSDLite's prediction layer: 3x3 depthwise (BN, ReLU6) -> 1x1 conv with bias.

    SSD's 3x3 convolution, made depthwise separable; ``forward`` returns the
    predictions of every location and default box: ``[N, H * W * boxes, columns]``.
    """

    def __init__(self, in_channels: int, boxes: int, columns: int) -> None:
        super().__init__()
        self.columns = columns
        self.dw = ConvBNAct(in_channels, in_channels, 3, groups=in_channels)  # dw
        self.pw = nn.Conv2d(in_channels, boxes * columns, 1)  # pw, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw(self.dw(x))
        # [N, boxes * columns, H, W] -> [N, H * W * boxes, columns]: location-major, the
        # order of the default boxes.
        return out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, self.columns)


class SSDLiteFeatures(nn.Module):
    """The backbone cut at the C4 expansion, then the extra layers: six feature maps.

    ``body`` runs the backbone up to and including the expansion (1x1 conv) of its first
    stride-32 block; ``tail`` runs the rest of that block (depthwise, SE, projection)
    and the backbone's remaining layers; ``extras`` are the four stride-2 extra layers.
    """

    def __init__(self, features: list[nn.Module], width_mult: float) -> None:
        super().__init__()
        stride, c4 = 1, None
        for i, layer in enumerate(features):
            stride *= layer.stride
            if stride == 32:
                c4 = i
                break
        block = features[c4] if c4 is not None else None
        if not isinstance(block, InvertedResidual) or isinstance(block.expand, nn.Identity):
            raise MobileNetError("SSDLite needs a backbone whose first stride-32 block expands")
        self.body = nn.Sequential(*features[:c4], block.expand)
        self.tail = nn.Sequential(
            nn.Sequential(block.dw, block.se, block.project), *features[c4 + 1 :]
        )
        channels = [block.expand.out_channels, features[-1].out_channels]
        extras = []
        for depth in EXTRA_CHANNELS:
            out = max(MIN_EXTRA_CHANNELS, int(depth * width_mult))
            extras.append(ExtraLayer(channels[-1], out))
            channels.append(out)
        self.extras = nn.ModuleList(extras)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c4 = self.body(x)
        maps = [c4, self.tail(c4)]
        for layer in self.extras:
            maps.append(layer(maps[-1]))
        return maps


class SSDLite(nn.Module):
    """An SSDLite detector (see the module docstring for inputs and outputs)."""

    task = "detection"

    def __init__(self, features: list[nn.Module], config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.features = SSDLiteFeatures(features, config.width_mult)
        self.default_boxes = DefaultBoxes(
            len(self.features.channels), min_scale=config.min_scale, max_scale=config.max_scale
        )
        boxes = self.default_boxes.boxes_per_location
        self.classification = nn.ModuleList(
            Predictor(c, boxes, config.num_classes) for c in self.features.channels
        )
        self.regression = nn.ModuleList(Predictor(c, boxes, 4) for c in self.features.channels)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.loss_config = LossConfig()
        _init_weights(self)
        set_bn_eps(self, config.bn_eps)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    # ---- the network

    def forward_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images ``[N, 3, S, S]`` -> class logits ``[N, A, num_classes]`` and
        box offsets ``[N, A, 4]``, for the ``A`` boxes of :meth:`anchors`."""
        return self._heads(self.features(x))

    def _heads(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.cat([p(m) for p, m in zip(self.classification, maps, strict=True)], 1)
        codes = torch.cat([p(m) for p, m in zip(self.regression, maps, strict=True)], 1)
        return logits, codes

    def anchors(self, image_size: int | None = None) -> torch.Tensor:
        """The default boxes ``[A, 4]`` (x1, y1, x2, y2, in pixels of the network input)
        for a square input of ``image_size`` (default: the model's)."""
        size = image_size or self.config.image_size
        grid = [size]
        for _ in range(len(self.features.channels) + 3):  # strides 2 .. 512
            grid.append((grid[-1] + 1) // 2)  # every stride-2 conv pads to ceil(n / 2)
        sizes = [(g, g) for g in grid[4:]]
        return self.default_boxes(sizes, (size, size))

    # ---- images in, detections or losses out

    def preprocess(
        self, images: list[torch.Tensor] | torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise, then resize to ``image_size`` (bilinear), as torchvision's
        ``GeneralizedRCNNTransform`` with a fixed size does; also the original sizes."""
        size = self.config.image_size
        param = next(self.parameters())
        mean = torch.tensor(self.config.mean, dtype=param.dtype, device=param.device)[:, None, None]
        std = torch.tensor(self.config.std, dtype=param.dtype, device=param.device)[:, None, None]

        def prepare(x: torch.Tensor) -> torch.Tensor:
            if x.dtype == torch.uint8:
                x = x.float() / 255
            x = (x.to(param.device, param.dtype) - mean) / std
            if tuple(x.shape[-2:]) != (size, size):
                batched = x if x.dim() == 4 else x[None]
                x = F.interpolate(batched, size=(size, size), mode="bilinear", align_corners=False)
            return x if x.dim() == 4 else x[None]

        if isinstance(images, torch.Tensor) and images.dim() == 4:
            sizes = [tuple(images.shape[-2:])] * len(images)
            return prepare(images), sizes  # type: ignore[return-value]
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
        return torch.cat([prepare(x) for x in images]), sizes

    def forward(
        self,
        images: list[torch.Tensor] | torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor] | Detections:
        batch, sizes = self.preprocess(images)
        maps = self.features(batch)
        logits, codes = self._heads(maps)
        size = self.config.image_size
        grid = [tuple(m.shape[-2:]) for m in maps]
        anchors = self.default_boxes(grid, (size, size)).to(batch.device)
        if self.training:
            if targets is None:
                raise MobileNetError("training mode needs targets")
            scaled = [
                _scale_target(t, hw, (size, size)) for t, hw in zip(targets, sizes, strict=True)
            ]
            return ssd_loss(logits, codes, anchors, scaled, self.box_coder, self.loss_config)
        return self.postprocess(logits, codes, anchors, sizes)

    @torch.no_grad()
    def postprocess(
        self,
        logits: torch.Tensor,
        codes: torch.Tensor,
        anchors: torch.Tensor,
        sizes: list[tuple[int, int]],
    ) -> Detections:
        """Softmax scores, decoded boxes clipped to the input, per class the top
        ``topk_candidates`` above ``score_thresh``, class-wise NMS, the best
        ``detections_per_img``; boxes mapped back to each image's own size."""
        cfg = self.config
        size = cfg.image_size
        scores = logits.softmax(-1)[..., 1:]  # [N, A, C - 1]: the background dropped
        boxes = self.box_coder.decode(codes, anchors).clamp(0, size)
        labels = torch.arange(1, cfg.num_classes, device=logits.device)
        k = min(cfg.topk_candidates, scores.shape[1])
        results: Detections = []
        for image_scores, image_boxes, (height, width) in zip(scores, boxes, sizes, strict=True):
            top, index = image_scores.topk(k, dim=0)  # [k, C - 1]: best boxes of each class
            keep = top > cfg.score_thresh
            top, index = top[keep], index[keep]
            top_labels = labels.expand_as(keep)[keep]
            top_boxes = image_boxes[index]
            kept = batched_nms(top_boxes, top, top_labels, cfg.nms_thresh)[: cfg.detections_per_img]
            scale = torch.tensor(
                [width / size, height / size] * 2, dtype=torch.float32, device=boxes.device
            )
            results.append(
                {"boxes": top_boxes[kept] * scale, "scores": top[kept], "labels": top_labels[kept]}
            )
        return results

    def set_bn_eps(self, eps: float) -> None:
        set_bn_eps(self, eps)
        self.config = DetectorConfig(**{**self.config.to_dict(), "bn_eps": eps})


def _scale_target(
    target: dict[str, torch.Tensor], size: tuple[int, int], new_size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    (h, w), (nh, nw) = size, new_size
    boxes = target["boxes"].to(torch.float32)
    if (h, w) != (nh, nw):
        boxes = boxes * boxes.new_tensor([nw / w, nh / h, nw / w, nh / h])
    return {"boxes": boxes, "labels": target["labels"]}


def _init_weights(model: nn.Module) -> None:
    """Normal(0, 0.03) convolutions, unit BatchNorm, momentum 0.03: the initialisation of
    TF's SSDLite configs (truncated normal, std 0.03) that torchvision also uses when it
    trains SSDLite from scratch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.momentum = 0.03


def _config(name: str, width_mult: float, num_classes: int, **kwargs: Any) -> DetectorConfig:
    width_mult = check_width_mult(width_mult)
    if num_classes < 2:
        raise MobileNetError(
            f"a detector needs num_classes >= 2 (the background and one class), got {num_classes}"
        )
    config = DetectorConfig(name, width_mult, num_classes, **kwargs)
    check_box_scales(config.min_scale, config.max_scale)
    return config


def check_box_scales(min_scale: float, max_scale: float) -> None:
    """Refuse default box scales outside ``0 < min_scale < max_scale <= 1``."""
    if not 0 < min_scale < max_scale <= 1:
        raise MobileNetError(
            "default box scales need 0 < min scale < max scale <= 1 "
            f"(min_scale < max_scale), got {min_scale} and {max_scale}"
        )


@register_model(task="detection")
def ssdlite_mobilenet_v2(width_mult: float = 1.0, num_classes: int = 91, **kwargs: Any) -> SSDLite:
    """SSDLite on MobileNetV2 (V2 Section 6.2, Table 6: 22.1 COCO mAP, 4.3M params, 0.8B
    MAdds at 320x320). ``kwargs``: the other :class:`DetectorConfig` fields."""
    config = _config("ssdlite_mobilenet_v2", width_mult, num_classes, **kwargs)
    backbone = mobilenet_v2.mobilenet_v2(width_mult=width_mult, num_classes=0)
    return SSDLite(list(backbone.features), config)


@register_model(task="detection")
def ssdlite_mobilenet_v3_large(
    width_mult: float = 1.0, num_classes: int = 91, **kwargs: Any
) -> SSDLite:
    """SSDLite on MobileNetV3-Large with the reduced tail (V3 Section 6.3): torchvision's
    ``ssdlite320_mobilenet_v3_large``, 3,440,060 params at 91 classes."""
    config = _config("ssdlite_mobilenet_v3_large", width_mult, num_classes, **kwargs)
    spec = mobilenet_v3.reduced_tail(mobilenet_v3.V3_LARGE)
    backbone = mobilenet_v3.build_v3(config.name, spec, width_mult, 0, 0.0, False)
    return SSDLite(list(backbone.features), config)


@register_model(task="detection")
def ssdlite_mobilenet_v3_small(
    width_mult: float = 1.0, num_classes: int = 91, **kwargs: Any
) -> SSDLite:
    """SSDLite on MobileNetV3-Small with the reduced tail (V3 Section 6.3)."""
    config = _config("ssdlite_mobilenet_v3_small", width_mult, num_classes, **kwargs)
    spec = mobilenet_v3.reduced_tail(mobilenet_v3.V3_SMALL)
    backbone = mobilenet_v3.build_v3(config.name, spec, width_mult, 0, 0.0, False)
    return SSDLite(list(backbone.features), config)
