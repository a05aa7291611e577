"""The evaluation preprocessing of each known checkpoint equals its library's own, pixel for
pixel, on real photographs; the JSON form round-trips and damaged forms are refused."""

import json

import pytest
import torch
from PIL import Image

from mobilenet.data.preprocess import Preprocess, ours
from mobilenet.data.published import KNOWN, TIMM_DEFAULTS, TORCHVISION_FILES
from mobilenet.data.transforms import eval_transform
from mobilenet.errors import MobileNetError
from mobilenet.models.base import EvalConfig
from mobilenet.models.pretrained import PRETRAINED

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Three real photographs of different sizes and aspect ratios."""
    return [Image.fromarray(f()) for f in (skimage_data.chelsea, skimage_data.astronaut,
                                           skimage_data.coffee)]  # fmt: skip


def _same_pixels(ours_out: torch.Tensor, theirs: torch.Tensor, p: Preprocess) -> None:
    """The same crop, pixel for pixel: the normalised values agree to float rounding
    (division vs multiplication by 1/255) and give back the same 8-bit pixels."""
    assert ours_out.shape == theirs.shape == (3, *p.crop)
    torch.testing.assert_close(ours_out, theirs, rtol=0, atol=2e-6)
    mean, std = torch.tensor(p.mean).view(3, 1, 1), torch.tensor(p.std).view(3, 1, 1)

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return ((x * std + mean) * 255).round().to(torch.uint8)

    assert torch.equal(pixels(ours_out), pixels(theirs))


def _torchvision_weights():
    from torchvision.models import (
        MobileNet_V2_Weights,
        MobileNet_V3_Large_Weights,
        MobileNet_V3_Small_Weights,
    )

    return {
        "mobilenet_v2.tv_in1k": MobileNet_V2_Weights.IMAGENET1K_V1,
        "mobilenet_v2.tv2_in1k": MobileNet_V2_Weights.IMAGENET1K_V2,
        "mobilenet_v3_large.tv_in1k": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        "mobilenet_v3_large.tv2_in1k": MobileNet_V3_Large_Weights.IMAGENET1K_V2,
        "mobilenet_v3_small.tv_in1k": MobileNet_V3_Small_Weights.IMAGENET1K_V1,
    }


@pytest.mark.parametrize("key", list(_torchvision_weights()))
def test_torchvision_weights_transforms_pixel_for_pixel(key, photos):
    weights = _torchvision_weights()[key]
    theirs, p = weights.transforms(), KNOWN[key]  # no download: a transform, not weights
    assert p.resize == theirs.resize_size[0] and p.crop == (theirs.crop_size[0],) * 2
    for photo in photos:
        _same_pixels(p.transform()(photo), theirs(photo), p)
    # The file name of each official checkpoint picks its preprocessing.
    assert TORCHVISION_FILES[weights.url.rsplit("/", 1)[1]] == key
    assert key in PRETRAINED and PRETRAINED[key].url == weights.url


TIMM_TAGS = [k for k in KNOWN if "." in k and ".tv" not in k]


@pytest.mark.parametrize("tag", TIMM_TAGS)
def test_timm_pretrained_cfgs_pixel_for_pixel(tag, photos):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(tag).to_dict())
    theirs, p = create_transform(**cfg), KNOWN[tag]
    assert (p.crop_pct, p.interpolation, p.mean, p.std) == (
        cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"],
    )  # fmt: skip
    for photo in photos:
        _same_pixels(p.transform()(photo), theirs(photo), p)


def test_timm_default_tags_are_timms_defaults():
    timm = pytest.importorskip("timm")
    for tag in TIMM_DEFAULTS.values():
        arch = tag.split(".")[0]
        assert timm.models.get_pretrained_cfg(arch).hf_hub_id == f"timm/{tag}"


def test_timm_at_another_size_follows_crop_pct(photos):
    """``at`` keeps a crop_pct, as timm's transform at another input size does."""
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    tag = "mobilenetv3_large_100.ra4_e3600_r224_in1k"
    cfg = resolve_data_config(
        {}, pretrained_cfg=timm.models.get_pretrained_cfg(tag).to_dict(), use_test_size=True
    )
    p = KNOWN[tag].at(cfg["input_size"][1]).replace(crop_pct=cfg["crop_pct"])
    _same_pixels(p.transform()(photos[0]), create_transform(**cfg)(photos[0]), p)


def test_ours_keeps_the_recipes_resize_and_the_old_transform(photos):
    p = ours(48)
    assert p.resize == 55 and p.crop == (48, 48)  # round(48 / 0.875), as training used
    old = eval_transform(48, EvalConfig())
    for photo in photos:
        assert torch.equal(old(photo), p.transform()(photo))
    digits = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)  # tensors resize too
    assert p.transform()(digits).shape == (3, 48, 48)


def test_json_round_trip_and_defaults():
    for p in [*KNOWN.values(), ours(48), Preprocess((224, 160), resize=240, crop_pct=None)]:
        assert Preprocess.from_json(p.to_json(), "x") == p
    p = Preprocess.from_dict({"mean": [0.5] * 3, "std": [0.5] * 3, "resize": 232}, 192)
    assert (p.resolution, p.resize, p.crop_pct, p.interpolation) == (192, 232, None, "bilinear")
    assert Preprocess.from_dict({"mean": [0] * 3, "std": [1] * 3}).resize_size == 256


def test_at_scales_an_explicit_resize():
    p = KNOWN["mobilenet_v2.tv2_in1k"]
    assert p.at(256).resize == 265 and p.at(224) is p
    assert KNOWN["imagenet"].at(160).resize_size == 182  # floor(160 / 0.875)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("not json", "is damaged"),
        ("[1, 2]", "JSON object"),
        ('{"mean": [0.5, 0.5, 0.5]}', "no 'std'"),
        ('{"mean": [0.5, 0.5], "std": [1, 1, 1]}', "mean must be 3 numbers"),
        ('{"mean": [0, 0, 0], "std": [1, 0, 1]}', "std must be > 0"),
        ('{"mean": [0, 0, 0], "std": [1, 1, 1], "crop_pct": 1.5}', "crop_pct must be in"),
        ('{"mean": [0, 0, 0], "std": [1, 1, 1], "resize": 232, "crop_pct": 0.9}', "not both"),
        ('{"mean": [0, 0, 0], "std": [1, 1, 1], "resize": 100}', "resize must be"),
        ('{"mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "cubic"}', "interpolation"),
        ('{"mean": [0, 0, 0], "std": [1, 1, 1], "cropp_pct": 0.9}', "unknown keys: cropp_pct"),
        ('{"mean": [0, 0, 0], "std": [1, 1, 1], "resolution": 0}', "resolution must be"),
    ],
)
def test_damaged_json_is_one_line(bad, message):
    with pytest.raises(MobileNetError, match=message) as e:
        Preprocess.from_json(bad, "w.safetensors", 224)
    assert "\n" not in str(e.value) and str(e.value).startswith("w.safetensors: ")


def test_schema_in_the_docstring_parses():
    """The JSON example of the module docstring is a valid preprocess (comments removed)."""
    import mobilenet.data.preprocess as module

    doc = module.__doc__ or ""
    block = doc[doc.index("{") : doc.index("}", doc.index('"std"')) + 1]
    text = "\n".join(line.split("#")[0] for line in block.splitlines())
    assert Preprocess.from_dict(json.loads(text)) == KNOWN["mobilenet_v2.tv2_in1k"]
