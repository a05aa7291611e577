"""The label-map executor (``memory_efficient(model, output="labels")``): the arg-max of the
logits, computed band by band so that the full-resolution logits never exist; equal to the
standard forward's arg-max, a fraction of its memory, what ``mobilenet predict`` writes.

Models have random BatchNorm statistics (``randomize_bn``), so that logits are O(1) and
their arg-max is not decided by rounding.
"""

import json
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mobilenet import MobileNetError, create_model, memory_efficient
from mobilenet.cli import main
from mobilenet.cli.segmentation import label_maps
from mobilenet.export import prepare_for_inference
from mobilenet.memory import MemoryEfficientSegmenter, measure_peak
from mobilenet.memory.heads import resize_rows, upsample_rows
from mobilenet.memory.labels import compare_labels, format_labels_report
from mobilenet.memory.segmentation import labels_dtype
from mobilenet.segmentation.predict import segment_images, trained_segmenter

from .helpers import randomize_bn

SEGMENTATION = [
    "lraspp_mobilenet_v3_large",
    "lraspp_mobilenet_v3_small",
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_mobilenet_v2",
]


@cache
def random_model(name: str, num_classes: int = 21) -> nn.Module:
    """Seeded: a draw whose two largest logits at some pixel are within the executor's
    rounding (1e-6) could swap them; these draws have none at the sizes below."""
    kwargs = {"aux_loss": True} if name.startswith("deeplab") else {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(name, width_mult=0.5, num_classes=num_classes, **kwargs)
    return randomize_bn(model).eval()


def standard_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)["out"]


@pytest.mark.parametrize("name", SEGMENTATION)
@pytest.mark.parametrize(("size", "band_rows"), [((72, 104), 16), ((67, 45), 5)])
def test_labels_are_the_standard_forwards_argmax(name, size, band_rows):
    """Non-square sizes, one not a multiple of the output stride, bands that do not divide
    the height; the labels are exactly the logits executor's arg-max too."""
    model = random_model(name)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    net = memory_efficient(model, splits=3, band_rows=band_rows, output="labels")
    assert isinstance(net, MemoryEfficientSegmenter) and net.aux_head is None
    labels = net(x)
    assert labels.dtype == torch.uint8 and labels.shape == (2, *size)
    assert torch.equal(labels.long(), standard_logits(model, x).argmax(1))
    logits = memory_efficient(model, splits=3, band_rows=band_rows)(x)["out"]
    assert torch.equal(labels.long(), logits.argmax(1))


def test_equal_logits_go_to_the_first_class():
    """Classes 3 and 7 tie at every pixel: both arg-maxes take 3, as torch.argmax."""
    model = create_model("lraspp_mobilenet_v3_small", width_mult=0.5).eval()
    with torch.no_grad():
        for conv in (model.head.low_classifier, model.head.high_classifier):
            conv.weight.zero_()
            conv.bias.zero_()
        model.head.low_classifier.bias[[3, 7]] = 1.0
    x = torch.randn(1, 3, 72, 104)
    labels = memory_efficient(model, output="labels")(x)
    assert (labels == 3).all() and (standard_logits(model, x).argmax(1) == 3).all()


@pytest.mark.parametrize(("n_in", "size"), [(9, (72, 104)), (13, (104, 57)), (65, (375, 500))])
@pytest.mark.parametrize("band_rows", [1, 5, 16])
def test_banded_resize_is_the_whole_image_resize(n_in, size, band_rows):
    """The kernel's separable path (height + width > 128, 21 channels); 65 -> 375 rows is
    where the source coordinate's rounding shows (1e-5 when rounded twice)."""
    g = torch.Generator().manual_seed(n_in)
    chw = torch.randn(21, n_in, n_in + 3, generator=g)
    expected = F.interpolate(chw[None], size, mode="bilinear", align_corners=False)[0]
    hwc = chw.permute(1, 2, 0).contiguous()
    bands = range(0, size[0], band_rows)
    rows = [(r0, min(r0 + band_rows, size[0])) for r0 in bands]
    chw_bands = torch.cat([upsample_rows(chw, size, *r, channels_last=False) for r in rows], 1)
    hwc_bands = torch.cat([upsample_rows(hwc, size, *r) for r in rows], 0)
    # Bit-identical on the CPUs this was built on; another CPU's vector kernels may round
    # a band's edge differently, so the check is what the bands mean: the whole resize.
    torch.testing.assert_close(chw_bands, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hwc_bands.permute(2, 0, 1), expected, rtol=1e-6, atol=1e-6)


def test_banded_resize_of_a_resize_is_two_whole_image_resizes():
    """What predict does: the logits at the input size resized to the image's own."""
    chw = torch.randn(21, 9, 13, generator=torch.Generator().manual_seed(1))
    mid, final = (72, 104), (50, 130)
    whole = F.interpolate(chw[None], mid, mode="bilinear", align_corners=False)
    expected = F.interpolate(whole, final, mode="bilinear", align_corners=False)[0]

    def rows_of(lo, hi):
        return upsample_rows(chw, mid, lo, hi, channels_last=False)

    bands = [resize_rows(rows_of, mid[0], final, r0, min(r0 + 7, 50)) for r0 in range(0, 50, 7)]
    torch.testing.assert_close(torch.cat(bands, 1), expected, rtol=1e-6, atol=1e-6)


def test_a_label_map_at_another_size():
    model = random_model("deeplabv3_mobilenet_v2")
    x = torch.randn(1, 3, 72, 104, generator=torch.Generator().manual_seed(2))
    net = memory_efficient(model, output="labels")
    for size in [(50, 130), (140, 90)]:
        resized = F.interpolate(standard_logits(model, x), size, mode="bilinear")
        assert torch.equal(net(x, size).long(), resized.argmax(1))


def test_the_peak_leaves_out_what_the_logits_take():
    """Measured with the profiler, output included: what the logits add to the logits
    executor's peak (its peak with them less its peak without), the label map's peak saves,
    but for the map's own bytes; it is below a fifth of the standard forward's peak, and
    the measurement agrees with the schedule."""
    model = create_model("lraspp_mobilenet_v3_large", width_mult=0.5).eval()
    x = torch.randn(1, 3, 256, 512)
    labels = memory_efficient(model, output="labels")
    logits = memory_efficient(model)
    peak, working, label_bytes = labels.analytic_peaks((256, 512))
    assert label_bytes == 256 * 512  # uint8
    measured = measure_peak(labels, x, module=labels)
    assert measured == pytest.approx(peak, rel=0.01)
    assert measure_peak(labels, x, module=labels, without_result=True) == pytest.approx(
        working, rel=0.01
    )
    with_logits = measure_peak(logits, x, module=logits)
    without_logits = measure_peak(logits, x, module=logits, without_result=True)
    assert with_logits - without_logits >= 0.8 * 4 * 21 * 256 * 512  # mostly the logits
    assert with_logits - measured >= with_logits - without_logits - label_bytes
    standard = prepare_for_inference(model, channels_last=False)

    def run(t):
        with torch.inference_mode():
            return standard(t)

    assert measured <= 0.2 * measure_peak(run, x, module=standard)


def test_the_smallest_dtype_that_holds_the_classes():
    assert labels_dtype(21) == labels_dtype(256) == torch.uint8
    assert labels_dtype(257) == labels_dtype(32768) == torch.int16
    assert labels_dtype(32769) == torch.int32
    model = random_model("lraspp_mobilenet_v3_small", num_classes=300)
    x = torch.randn(1, 3, 72, 104, generator=torch.Generator().manual_seed(3))
    labels = memory_efficient(model, output="labels")(x)
    assert labels.dtype == torch.int16
    assert torch.equal(labels.long(), standard_logits(model, x).argmax(1))


def test_refusals_in_one_line(capsys):
    classifier = create_model("mobilenet_v2", width_mult=0.35)
    segmenter = random_model("lraspp_mobilenet_v3_small")
    refused = [
        (lambda: memory_efficient(classifier, output="labels"), "mobilenet_v2 is a classifier"),
        (lambda: memory_efficient(segmenter, output="probs"), "not 'probs'"),
        (lambda: memory_efficient(segmenter)(torch.randn(1, 3, 64, 64), (32, 32)), "label map"),
    ]
    for call, message in refused:
        with pytest.raises(MobileNetError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    broken = create_model("lraspp_mobilenet_v3_small", width_mult=0.5).eval()
    with torch.no_grad():
        broken.head.low_classifier.bias.fill_(float("nan"))
    with pytest.raises(MobileNetError, match=r"outputs NaN or infinite values.*no label map"):
        memory_efficient(broken, output="labels")(torch.randn(1, 3, 64, 64))
    assert main(["memory", "mobilenet_v2", "--output", "labels"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mobilenet_v2 is a classifier, whose output is logits" in err
    with pytest.raises(SystemExit):
        main(["memory", "lraspp_mobilenet_v3_small", "--output", "probs"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'probs'" in err


def test_cli_reports_the_label_map(capsys):
    args = ["memory", "lraspp_mobilenet_v3_small", "--width-mult", "0.35", "--resolution"]
    assert main([*args, "64x96", "--output", "labels", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labels_dtype"] == "uint8" and out["pixels"] == 64 * 96
    assert out["output_bytes"] == {"logits": 4 * 21 * 64 * 96, "labels": 64 * 96}
    assert set(out["measured"]) == {"standard", "logits", "labels"}
    assert out["equal_to_logits"] == out["pixels"]


def test_the_report_counts_what_agrees():
    model = random_model("deeplabv3_mobilenet_v2")
    report = compare_labels(model, splits=2, resolution=(48, 80), repeats=1)
    assert report.equal_to_standard == report.equal_to_logits == report.pixels == 48 * 80
    assert report.largest_gap_differing == 0.0
    assert report.measured["labels"] < report.measured["standard"]
    table = format_labels_report(report).splitlines()  # what the CLI prints without --json
    assert "at 48x80" in table[0] and "executor: labels" in table[1]
    assert "label map uint8 0.00 MiB" in table[-2]
    assert table[-1] == "labels: the standard forward's arg-max at 3,840 of 3,840 pixels, " + (
        "the logits executor's at 3,840"
    )


def _image(folder: Path, name: str, size: tuple[int, int]) -> str:
    rng = torch.Generator().manual_seed(size[0])
    pixels = torch.randint(0, 255, (*size, 3), dtype=torch.uint8, generator=rng).numpy()
    Image.fromarray(pixels).save(folder / name)
    return str(folder / name)


@pytest.mark.parametrize(("name", "num_classes"), [("deeplabv3_mobilenet_v2", 21),
                                                   ("lraspp_mobilenet_v3_large", 3)])  # fmt: skip
def test_predict_writes_the_same_masks_with_the_label_maps(name, num_classes, tmp_path):
    """mobilenet predict's executor: images smaller and larger than the model's input,
    whose logits are resized to the image's size; the same files and shares."""
    model = random_model(name, num_classes=num_classes)
    classes = [f"c{i}" for i in range(num_classes)]
    trained = trained_segmenter(model, classes, (72, 104))
    images = [_image(tmp_path, "small.png", (50, 75)), _image(tmp_path, "large.png", (130, 90))]
    executor = label_maps(model)
    assert isinstance(executor, MemoryEfficientSegmenter) and executor.output == "labels"
    assert label_maps(nn.Identity()) is None  # an ONNX file's model: its own forward
    standard = segment_images(trained, images, tmp_path / "standard")
    labelled = segment_images(trained, images, tmp_path / "labels", executor)
    for a, b in zip(standard, labelled, strict=True):
        assert a["classes"] == b["classes"]
        for key in ("mask", "overlay"):
            first, second = Image.open(a[key]), Image.open(b[key])
            assert first.mode == second.mode and first.getpalette() == second.getpalette()
            assert first.tobytes() == second.tobytes()
