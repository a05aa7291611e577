"""Weights interop: torchvision and timm checkpoints load with identical outputs."""

import hashlib
import io
import os

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import mobilenet
from mobilenet import CheckpointError, create_model, load_weights, save_weights
from mobilenet import weights as W
from mobilenet.models import pretrained as P

from .helpers import randomize_bn, recalibrate_bn, unit_scale_logits

TORCHVISION = [
    ("mobilenet_v2", "mobilenet_v2", 1.0),
    ("mobilenet_v3_large", "mobilenet_v3_large", 1.0),
    ("mobilenet_v3_small", "mobilenet_v3_small", 1.0),
]
TIMM = [
    ("mobilenetv1_100", "mobilenet_v1", 1.0),
    ("mobilenetv1_125", "mobilenet_v1", 1.25),
    ("mobilenetv2_035", "mobilenet_v2", 0.35),
    ("mobilenetv2_050", "mobilenet_v2", 0.5),
    ("mobilenetv2_075", "mobilenet_v2", 0.75),
    ("mobilenetv2_100", "mobilenet_v2", 1.0),
    ("mobilenetv2_140", "mobilenet_v2", 1.4),
    ("mobilenetv3_large_075", "mobilenet_v3_large", 0.75),
    ("mobilenetv3_large_100", "mobilenet_v3_large", 1.0),
    ("mobilenetv3_small_050", "mobilenet_v3_small", 0.5),
    ("mobilenetv3_small_075", "mobilenet_v3_small", 0.75),
    ("mobilenetv3_small_100", "mobilenet_v3_small", 1.0),
]


def _reference(library: str, name: str, num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(0)
    if library == "torchvision":
        ref = getattr(torchvision.models, name)(num_classes=num_classes)
    else:
        ref = timm.create_model(name, pretrained=False, num_classes=num_classes)
    ref = recalibrate_bn(randomize_bn(ref), resolution=64)
    classifier = ref.get_classifier() if library == "timm" else ref.classifier[-1]
    return unit_scale_logits(ref, classifier)


def _assert_same_outputs(ref, ours, resolutions=(224, 160)):
    ref.eval()
    ours.eval()
    for r in resolutions:
        x = torch.randn(2, 3, r, r, generator=torch.Generator().manual_seed(r))
        with torch.no_grad():
            expected, actual = ref(x), ours(x)
        assert expected.abs().max() > 1e-2  # a comparison of real signals, not of zeros
        assert (expected - actual).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("ref_name", "ours", "width"), TORCHVISION)
def test_torchvision_state_dict_gives_identical_outputs(ref_name, ours, width, tmp_path):
    ref = _reference("torchvision", ref_name)
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    model = create_model(ours, width_mult=width)
    assert load_weights(model, path) == "torchvision"
    _assert_same_outputs(ref, model)


@pytest.mark.parametrize(("ref_name", "ours", "width"), TIMM)
def test_timm_state_dict_gives_identical_outputs(ref_name, ours, width, tmp_path):
    ref = _reference("timm", ref_name)
    path = tmp_path / "model.safetensors"  # as the Hugging Face hub ships timm weights
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = create_model(ours, width_mult=width)
    # A V3 state dict is the same for mobilenetv3_* and tf_mobilenetv3_*: the origin says.
    assert load_weights(model, path, origin=f"timm:{ref_name}") == "timm"
    _assert_same_outputs(ref, model)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_any_number_of_classes(library):
    name = "mobilenet_v3_small" if library == "torchvision" else "mobilenetv3_small_100"
    ref = _reference(library, name, num_classes=17)
    model = create_model("mobilenet_v3_small", num_classes=17)
    load_weights(model, ref.state_dict(), origin=f"{library}:{name}")
    _assert_same_outputs(ref, model, resolutions=(96,))


def test_source_batchnorm_epsilon_is_adopted():
    model = create_model("mobilenet_v3_large")
    load_weights(model, torchvision.models.mobilenet_v3_large().state_dict())
    assert model.features[0].bn.eps == 1e-3 and model.config.bn_eps == 1e-3
    timm_v3 = timm.create_model("mobilenetv3_large_100").state_dict()
    load_weights(model, timm_v3, origin="timm:mobilenetv3_large_100")
    assert model.features[0].bn.eps == 1e-5 and model.config.bn_eps == 1e-5


def test_own_safetensors_round_trip(tmp_path):
    model = recalibrate_bn(
        randomize_bn(create_model("mobilenet_v2", width_mult=0.5, num_classes=4))
    )
    model.set_bn_eps(1e-5)
    path = save_weights(model, tmp_path / "w.safetensors", {"note": "kept"})
    assert not [p for p in tmp_path.iterdir() if p.name != "w.safetensors"]  # no temp files
    # create_model takes width, classes and BatchNorm epsilon from the file's metadata.
    loaded = create_model("mobilenet_v2", weights=str(path))
    assert loaded.config == model.config
    _assert_same_outputs(model, loaded, resolutions=(96,))
    _, metadata = W.read_checkpoint(path)
    assert metadata["note"] == "kept" and W.saved_config(metadata) == model.config.to_dict()


def test_training_checkpoint_wrappers_and_ddp_prefix(tmp_path):
    ref = _reference("timm", "mobilenetv2_050")
    path = tmp_path / "checkpoint.pth.tar"
    wrapped = {"module." + k: v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": wrapped, "arch": "mobilenetv2_050"}, path)
    model = create_model("mobilenet_v2", width_mult=0.5)
    load_weights(model, path)
    _assert_same_outputs(ref, model, resolutions=(96,))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_wrong_width_is_refused_naming_the_tensors_and_loading_nothing():
    model = create_model("mobilenet_v2")
    before = _state(model)
    with pytest.raises(CheckpointError, match="mis-shaped") as info:
        load_weights(model, timm.create_model("mobilenetv2_050").state_dict())
    assert "features.0.conv.weight (checkpoint [16, 3, 3, 3], model [32, 3, 3, 3])" in str(
        info.value
    )
    assert _unchanged(model, before)


def test_wrong_number_of_classes_gets_a_hint():
    model = create_model("mobilenet_v3_small")
    with pytest.raises(CheckpointError, match="number of classes"):
        load_weights(model, torchvision.models.mobilenet_v3_small(num_classes=10).state_dict())


def test_wrong_architecture_names_missing_and_unexpected():
    model = create_model("mobilenet_v3_small")
    before = _state(model)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, torchvision.models.mobilenet_v3_large().state_dict())
    message = str(info.value)
    assert "unexpected" in message and "mis-shaped" in message
    assert _unchanged(model, before)


def test_own_file_of_another_model_is_refused(tmp_path):
    path = save_weights(create_model("mobilenet_v3_small"), tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="holds mobilenet_v3_small"):
        load_weights(create_model("mobilenet_v3_large"), path)


def test_missing_tensors_are_named():
    state = torchvision.models.mobilenet_v2().state_dict()
    del state["features.3.conv.1.0.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing: features\.3\.dw\.conv\.weight"):
        load_weights(create_model("mobilenet_v2"), state)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable checkpoint"),
        (b"this is not a checkpoint at all", "not a readable checkpoint"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{broken", "not a readable safetensors"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_weights(create_model("mobilenet_v2"), path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(create_model("mobilenet_v2"), "/no/such/file.safetensors")


def test_unrecognised_layout():
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_weights(create_model("mobilenet_v2"), {"fc.weight": torch.zeros(2, 2)})


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickles_are_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    buffer = io.BytesIO()
    torch.save({"features.0.0.weight": torch.zeros(1), "evil": _Exploit()}, buffer)
    (tmp_path / "evil.pth").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="weights_only"):
        load_weights(create_model("mobilenet_v2"), tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- downloads


@pytest.fixture
def official_file(tmp_path, monkeypatch):
    """A torchvision-style official checkpoint served from a file:// URL."""
    ref = _reference("torchvision", "mobilenet_v3_small")
    source = tmp_path / "server" / "mobilenet_v3_small-0000.pth"
    source.parent.mkdir()
    torch.save(ref.state_dict(), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setenv("MOBILENET_HOME", str(tmp_path / "cache"))
    return ref, source.as_uri(), digest


def test_official_weights_are_downloaded_checked_and_cached(official_file, monkeypatch, tmp_path):
    ref, url, digest = official_file
    entry = P.Pretrained("mobilenet_v3_small", url, digest[:8], 0.0)
    monkeypatch.setitem(P.PRETRAINED, "mobilenet_v3_small.test", entry)
    model = create_model("mobilenet_v3_small", weights="mobilenet_v3_small.test")
    _assert_same_outputs(ref, model, resolutions=(96,))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["mobilenet_v3_small-0000.pth"]
    assert "mobilenet_v3_small.test" in P.list_pretrained("mobilenet_v3_small")


def test_download_with_a_wrong_hash_is_refused_and_leaves_nothing(official_file, tmp_path):
    _, url, digest = official_file
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    with pytest.raises(CheckpointError, match="does not match"):
        W.download(url, wrong)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_official_entries_are_consistent():
    for name, entry in P.PRETRAINED.items():
        assert name.split(".")[0] == entry.model in mobilenet.list_models()
        assert entry.sha256 in entry.url  # torchvision names files by their hash prefix
