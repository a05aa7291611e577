"""Files users already have still load and compute what they did.

``tests/fixtures/legacy`` holds files written by an earlier version of the toolkit (its
README says which, and how), the fixed inputs, and what that version's loaders gave:
every format ``export`` and ``quantize`` write, a detector and a segmenter. Each file is
loaded here through today's public loaders and must report the same classes, resolution
and preprocessing and give the same outputs: float files to 1e-4 of their outputs'
scale (another CPU's kernels sum in another order), int8 files within the rounding
noise of their own network (another CPU's int8 kernels round some activations the other
way; see :mod:`mobilenet.export.int8_check`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mobilenet.classification.predict import load_trained
from mobilenet.detection.predict import load_detector
from mobilenet.export.int8_check import NOISE_FLOOR, SLACK, probe_sensitivity
from mobilenet.segmentation.predict import load_segmenter

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
TENSORS = load_file(FIXTURES / "expected.safetensors")
FILES = EXPECTED["files"]
# What is in the folder besides the files under test.
NOT_FIXTURES = {"README.md", "make_fixtures.py", "expected.json", "expected.safetensors"}
# The modules a format's loader needs (its extra); a format without them is skipped.
NEEDS = {
    ".onnx": ("onnx", "onnxruntime"),
    ".pte": ("executorch",),
    ".tflite": ("litert_torch", "ai_edge_litert"),
}
DETECTION_KEYS = ("boxes", "scores", "labels")
FLOAT_TOLERANCE = 1e-4  # of the outputs' scale (their largest magnitude, at least 1)
# The unit of int8 differences: the spread (standard deviation) of the float logits.
SPREAD = float(TENSORS["classifier.safetensors/logits"].std())


def files_of(model: str) -> list[str]:
    return [name for name, entry in FILES.items() if entry["model"] == model]


def require_extra(name: str) -> None:
    for module in NEEDS.get(Path(name).suffix, ()):
        pytest.importorskip(module)


def plain(value):
    """Tuples as lists, as ``expected.json`` keeps them."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, not {tuple(want.shape)}"
    scale = max(1.0, float(want.abs().max()))
    worst = float((got.float() - want).abs().max())
    assert worst <= FLOAT_TOLERANCE * scale, f"{what}: differs by {worst:.2e} (scale {scale:.2f})"


def int8_noise(model, x: torch.Tensor) -> float:
    """How far an int8 file's logits move when its input moves by half an 8-bit step (as
    far as another CPU's kernels, rounding some activations the other way, move them),
    in units of the float model's logit spread; at least :data:`NOISE_FLOOR`."""
    with torch.no_grad():
        own = torch.as_tensor(model(x)).detach().clone()
    return max(probe_sensitivity(model, x, own) / SPREAD, NOISE_FLOOR)


def int8_disagreement(got: torch.Tensor, wants: list[torch.Tensor], noise: float) -> str | None:
    """Why ``got`` (today's logits of an int8 file) is none of ``wants`` (the logits it
    gave when it was written) up to the network's rounding ``noise``, or None. In units of
    the float model's logit spread: the RMS difference within :data:`SLACK` times the
    noise, and every image's first class one that the expected logits score within twice
    that of their own first (a near-tie may flip)."""
    allowed = SLACK * noise
    reasons = []
    for want in wants:
        if got.shape != want.shape:
            reasons.append(f"shape {tuple(got.shape)}, not {tuple(want.shape)}")
            continue
        error = float((got.double() - want.double()).pow(2).mean().sqrt()) / SPREAD
        first = got.argmax(1)
        gaps = (want.max(1).values - want.gather(1, first[:, None])[:, 0]) / SPREAD
        if error > allowed:
            reasons.append(f"{error:.3f} of the logits' spread away, more than {allowed:.3f}")
        elif float(gaps.max()) > 2 * allowed:
            reasons.append(f"first classes {first.tolist()}, not {want.argmax(1).tolist()}")
        else:
            return None
    return "; ".join(reasons)


def test_every_fixture_is_checked():
    """A file added to the folder without its expected outputs would go untested; a
    format left out when the fixtures were made would be missed without a word."""
    present = {p.name for p in FIXTURES.iterdir()} - NOT_FIXTURES
    assert present == set(FILES)
    assert EXPECTED["left_out"] == {}
    suffixes = {Path(name).suffix for name in files_of("classifier")}
    assert suffixes == {".safetensors", ".onnx", ".pt2", ".pte", ".tflite"}
    assert {"detector.safetensors", "detector.onnx"} <= set(FILES)
    assert {"segmenter.safetensors", "segmenter.onnx"} <= set(FILES)


@pytest.mark.parametrize("name", files_of("classifier"))
def test_classifier_file(name: str):
    require_extra(name)
    expected = FILES[name]
    trained = load_trained(str(FIXTURES / name))
    assert trained.classes == expected["classes"]
    assert trained.resolution == expected["resolution"]
    assert plain(dataclasses.asdict(trained.eval_preprocess())) == expected["preprocess"]
    x = TENSORS["inputs/classifier"]
    with torch.no_grad():
        got = torch.as_tensor(trained.model(x)).detach().clone()
    want = TENSORS[f"{name}/logits"]
    if expected["precision"] == "int8":
        # An int8 ONNX file gives one of two results: ONNX Runtime's fused kernels
        # saturate on a CPU without VNNI, not with it (then they give the unfused graph's).
        wants = [want] + [TENSORS[k] for k in (f"{name}/logits_unfused",) if k in TENSORS]
        reason = int8_disagreement(got, wants, int8_noise(trained.model, x))
        assert reason is None, f"{name}: {reason}"
    else:
        assert_close(got, want, name)


def test_the_int8_rule_refuses_what_a_misread_file_gives():
    """The rule above is not so loose that a file read wrongly would pass: at the noise
    these files measure (0.04 to 0.1 of the spread), two classes exchanged, logits at
    half their scale or images in another order are refused; the logits themselves, or
    either of an ONNX file's two results, are not."""
    want = TENSORS["classifier_int8.safetensors/logits"]
    noise = 0.1
    assert int8_disagreement(want, [want], noise) is None
    assert int8_disagreement(want[:, [1, 0, *range(2, 10)]], [want], noise) is not None
    assert int8_disagreement(want * 0.5, [want], noise) is not None
    assert int8_disagreement(want.roll(1, dims=0), [want], noise) is not None
    fused, unfused = (TENSORS[f"classifier_int8.onnx/{k}"] for k in ("logits", "logits_unfused"))
    assert int8_disagreement(unfused, [fused, unfused], noise) is None
    assert int8_disagreement(unfused, [fused], noise) is not None


def test_detector_file():
    name = "detector.safetensors"
    expected = FILES[name]
    trained = load_detector(FIXTURES / name)
    detector = trained.model
    assert [{"id": c.id, "name": c.name} for c in trained.categories] == expected["categories"]
    assert detector.config.image_size == expected["image_size"]
    x = TENSORS["inputs/detector"]
    with torch.no_grad():
        batch, _ = detector.preprocess(x)
        logits, codes = detector.forward_raw(batch)
        found = detector(x)
    assert_close(logits, TENSORS[f"{name}/logits"], f"{name} logits")
    assert_close(codes, TENSORS[f"{name}/box_codes"], f"{name} box codes")
    assert_close(detector.anchors(), TENSORS[f"{name}/default_boxes"], f"{name} default boxes")
    assert [len(d["scores"]) for d in found] == expected["detections"]
    for i, detections in enumerate(found):
        want = {k: TENSORS[f"{name}/detections/{i}/{k}"] for k in DETECTION_KEYS}
        assert_same_detections(detections, want, f"{name} image {i}")


def assert_same_detections(got: dict, want: dict, what: str) -> None:
    """The same detections, matched one to one whatever their order (two of nearly equal
    scores may come in either order): label equal, score and box within tolerance (the
    boxes' in pixels of their largest coordinate)."""
    largest = float(want["boxes"].abs().max()) if len(want["boxes"]) else 1.0
    box_tolerance = FLOAT_TOLERANCE * max(1.0, largest)
    unused = list(range(len(got["scores"])))
    for box, score, label in zip(want["boxes"], want["scores"], want["labels"], strict=True):
        match = next(
            (
                j
                for j in unused
                if int(got["labels"][j]) == int(label)
                and abs(float(got["scores"][j]) - float(score)) <= FLOAT_TOLERANCE
                and float((got["boxes"][j] - box).abs().max()) <= box_tolerance
            ),
            None,
        )
        assert match is not None, f"{what}: no detection of {int(label)} at {box.tolist()}"
        unused.remove(match)
    assert not unused, f"{what}: {len(unused)} detections more than it gave"


def test_detections_are_matched_whatever_their_order():
    want = {k: TENSORS[f"detector.safetensors/detections/1/{k}"] for k in DETECTION_KEYS}
    reordered = torch.arange(len(want["scores"])).flip(0)
    assert_same_detections({k: v[reordered] for k, v in want.items()}, want, "reordered")
    with pytest.raises(AssertionError, match="no detection"):
        assert_same_detections({k: v[1:] for k, v in want.items()}, want, "one fewer")
    relabelled = {**want, "labels": 3 - want["labels"]}  # labels 1 and 2 exchanged
    with pytest.raises(AssertionError, match="no detection"):
        assert_same_detections(relabelled, want, "relabelled")
    doubled = {k: torch.cat([v, v[:1]]) for k, v in want.items()}
    with pytest.raises(AssertionError, match="more than"):
        assert_same_detections(doubled, want, "one more")


def test_detector_onnx_file():
    """A detector's ONNX file has no loader of its own: its graph runs in ONNX Runtime,
    with its metadata, as ``export`` documents it."""
    name = "detector.onnx"
    require_extra(name)
    from mobilenet.export.onnx import onnx_session, read_metadata

    expected = FILES[name]
    session = onnx_session(FIXTURES / name)
    metadata = read_metadata(session)
    assert json.loads(metadata["categories"]) == expected["categories"]
    assert int(metadata["resolution"]) == expected["resolution"]
    names = [o.name for o in session.get_outputs()]
    assert names == expected["outputs"]
    outputs = session.run(None, {"images": TENSORS["inputs/detector"].numpy()})
    for output, value in zip(names, outputs, strict=True):
        assert_close(torch.from_numpy(value), TENSORS[f"{name}/{output}"], f"{name} {output}")


@pytest.mark.parametrize("name", files_of("segmenter"))
def test_segmenter_file(name: str):
    require_extra(name)
    expected = FILES[name]
    trained = load_segmenter(FIXTURES / name)
    assert trained.classes == expected["classes"]
    assert list(trained.size) == expected["size"]
    with torch.no_grad():
        got = trained.model(TENSORS["inputs/segmenter"])["out"]
    assert_close(got, TENSORS[f"{name}/out"], name)
