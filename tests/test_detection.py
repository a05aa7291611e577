"""SSDLite: default boxes, box coding, matching, loss, models, cost and torchvision parity."""

import math

import pytest
import torch
import torchvision
from torch import nn

import mobilenet
from mobilenet import MobileNetError, create_model, list_models
from mobilenet.detection import BoxCoder, DefaultBoxes, LossConfig, SSDLite, match, ssd_loss
from mobilenet.weights import save_weights

from .helpers import randomize_bn

DETECTORS = list_models(task="detection")


def test_detectors_are_registered_apart_from_classifiers():
    assert DETECTORS == [
        "ssdlite_mobilenet_v2",
        "ssdlite_mobilenet_v3_large",
        "ssdlite_mobilenet_v3_small",
    ]
    assert not set(DETECTORS) & set(list_models())
    segmentation = list_models(task="segmentation")
    encoders = list_models(task="encoder")
    assert list_models(task=None) == list_models() + DETECTORS + segmentation + encoders


def test_default_boxes_follow_ssd_scales():
    boxes = DefaultBoxes()
    assert boxes.boxes_per_location == 6
    assert boxes.scales[0] == pytest.approx(0.2) and boxes.scales[5] == pytest.approx(0.95)
    wh = boxes.shapes(0)
    # aspect ratio 1 at s_0, at sqrt(s_0 s_1), then 2, 1/2, 3, 1/3
    assert wh[0].tolist() == pytest.approx([0.2, 0.2])
    assert wh[1, 0].item() == pytest.approx(math.sqrt(0.2 * 0.35))
    ratios = (wh[:, 0] / wh[:, 1]).tolist()
    assert ratios == pytest.approx([1, 1, 2, 0.5, 3, 1 / 3])
    anchors = boxes([(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], (320, 320))
    assert anchors.shape == (6 * (400 + 100 + 25 + 9 + 4 + 1), 4)
    first = anchors[0]  # centre of cell (0, 0) of the 20x20 map, 0.2 * 320 = 64 wide
    assert first.tolist() == pytest.approx([8 - 32, 8 - 32, 8 + 32, 8 + 32])


def test_box_coder_round_trip_and_weights():
    coder = BoxCoder()
    defaults = torch.tensor([[10.0, 10, 50, 30], [0, 0, 100, 100]])
    boxes = torch.tensor([[12.0, 8, 60, 33], [5, 20, 80, 90]])
    codes = coder.encode(boxes, defaults)
    assert torch.allclose(coder.decode(codes, defaults), boxes, atol=1e-4)
    # (10, 10, 5, 5): a centre shift of one default-box width codes as 10
    shifted = coder.encode(torch.tensor([[50.0, 10, 90, 30]]), defaults[:1])
    assert shifted[0].tolist() == pytest.approx([10, 0, 0, 0])


def test_matching_threshold_and_best_default_box():
    defaults = torch.tensor([[0.0, 0, 10, 10], [0, 0, 9, 10], [50, 50, 60, 60], [80, 80, 90, 90]])
    gt = torch.tensor([[0.0, 0, 10, 10], [70, 70, 100, 100]])
    matched = match(gt, defaults, 0.5)
    # boxes 0, 1 overlap gt 0 at IoU >= 0.5; gt 1 overlaps box 3 at IoU 1/9 only, but
    # takes it as its best; box 2 overlaps nothing
    assert matched.tolist() == [0, 0, -1, 1]
    assert match(torch.zeros(0, 4), defaults).tolist() == [-1] * 4


def test_loss_mines_three_negatives_per_positive():
    defaults = torch.tensor(
        [[0.0, 0, 10, 10]] + [[20.0 * i, 50, 20 * i + 10, 60] for i in range(9)]
    )
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}]
    logits = torch.zeros(1, 10, 3)
    logits[0, 1:, 1] = torch.arange(9.0)  # background boxes, increasingly wrong
    codes = torch.zeros(1, 10, 4)
    losses = ssd_loss(logits, codes, defaults, targets, BoxCoder())
    ce = torch.nn.functional.cross_entropy(logits[0], torch.tensor([2] + [0] * 9), reduction="none")
    expected = ce[0] + ce[-3:].sum()  # the positive and the 3 hardest negatives
    assert losses["classification"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["bbox_regression"].item() == pytest.approx(0.0, abs=1e-6)
    focal = ssd_loss(logits, codes, defaults, targets, BoxCoder(), LossConfig(focal=True))
    p_t = torch.exp(-ce)
    alpha = torch.tensor([0.25] + [0.75] * 9)
    expected_focal = (alpha * (1 - p_t) ** 2 * ce).sum()  # every box, RetinaNet's weights
    assert focal["classification"].item() == pytest.approx(expected_focal.item(), rel=1e-6)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_train_and_eval_outputs(name):
    torch.manual_seed(0)
    model = create_model(name, width_mult=0.5, num_classes=4, image_size=96)
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 120)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[0.0, 5, 30, 40], [60, 20, 110, 70]]),
            "labels": torch.tensor([3, 2]),
        },
    ]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, (h, w) in zip(detections, [(96, 96), (80, 120)], strict=True):
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["boxes"].shape[1] == 4
        assert (det["boxes"][:, 2] <= w + 1e-4).all() and (det["boxes"][:, 3] <= h + 1e-4).all()
        assert ((det["labels"] >= 1) & (det["labels"] < 4)).all()


def test_bad_num_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("ssdlite_mobilenet_v2", num_classes=1)
    with pytest.raises(MobileNetError):
        create_model("ssdlite_mobilenet_v2", width_mult=0)


def test_cost_matches_the_papers_and_torchvision():
    # V2 Table 6: MNetV2 + SSDLite, 4.3M params and 0.8B MAdds at 320x320 (91 classes)
    v2 = mobilenet.cost("ssdlite_mobilenet_v2", 320)
    assert v2.params == pytest.approx(4.3e6, rel=0.1)
    assert v2.madds == pytest.approx(0.8e9, rel=0.1)
    # torchvision's ssdlite320_mobilenet_v3_large: 3,440,060 params, 0.583 GFLOPS
    v3 = mobilenet.cost("ssdlite_mobilenet_v3_large", 320)
    assert v3.params == 3_440_060
    assert v3.madds == pytest.approx(0.583e9, rel=0.01)
    assert v3.model == "ssdlite_mobilenet_v3_large"


def _torchvision_detector() -> nn.Module:
    torch.manual_seed(0)
    tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None
    )
    randomize_bn(tv)
    with torch.no_grad():  # scores spread over (0, 1), so the ranking is well defined
        for m in tv.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in")
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
        for block in tv.head.classification_head.module_list:
            block[1].weight.mul_(0.2)
    return tv.eval()


def test_torchvision_ssdlite_parity():
    tv = _torchvision_detector()
    ours = create_model("ssdlite_mobilenet_v3_large")
    assert mobilenet.load_weights(ours, tv.state_dict()) == "torchvision"
    ours.eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 320, 320, generator=g), torch.rand(3, 240, 400, generator=g)]
    images.append(torch.rand(3, 500, 180, generator=g))
    with torch.no_grad():
        expected, got = tv(images), ours(images)
    for e, o in zip(expected, got, strict=True):
        assert len(e["boxes"]) == len(o["boxes"]) > 0
        assert len(e["scores"].unique()) > len(e["scores"]) // 2  # few ties
        assert torch.allclose(o["boxes"], e["boxes"], atol=1e-3)
        assert torch.allclose(o["scores"], e["scores"], atol=1e-4)
        assert torch.equal(o["labels"], e["labels"])


def test_default_box_scales_are_configurable_and_checked():
    model = create_model("ssdlite_mobilenet_v3_small", num_classes=3, min_scale=0.1, max_scale=0.5)
    assert model.default_boxes.scales[0] == pytest.approx(0.1)
    assert model.default_boxes.scales[5] == pytest.approx(0.5)
    first = model.anchors()[0]  # the 20x20 map of a 320 input: 0.1 * 320 = 32 wide
    assert first.tolist() == pytest.approx([8 - 16, 8 - 16, 8 + 16, 8 + 16])
    for low, high in ((0.5, 0.5), (0.0, 0.5), (0.2, 1.5)):
        with pytest.raises(ValueError, match="min_scale < max_scale"):
            create_model("ssdlite_mobilenet_v3_small", min_scale=low, max_scale=high)


def test_detector_weights_round_trip(tmp_path):
    model = randomize_bn(
        create_model("ssdlite_mobilenet_v3_small", num_classes=5, image_size=128, min_scale=0.1)
    )
    path = save_weights(model, tmp_path / "det.safetensors")
    loaded = create_model("ssdlite_mobilenet_v3_small", weights=str(path))
    assert isinstance(loaded, SSDLite)
    assert loaded.config == model.config
    x = [torch.rand(3, 128, 128)]
    with torch.no_grad():
        a, b = model.eval()(x)[0], loaded.eval()(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    with pytest.raises(MobileNetError, match="holds ssdlite_mobilenet_v3_small"):
        mobilenet.load_weights(create_model("ssdlite_mobilenet_v2", num_classes=5), path)
