"""Keras applications' MobileNets (V1, V2, V3) load with Keras' outputs, Keras the oracle."""

import json
import os
import re

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: no TensorFlow needed

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open

from mobilenet import CheckpointError, create_model, load_weights
from mobilenet.cli import main

keras = pytest.importorskip("keras")
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402

apps = keras.applications
FORMATS = ("h5", "weights.h5", "keras")


def _build(app: str, alpha: float, size: int, **kw) -> "keras.Model":
    builders = {
        "v1": apps.MobileNet,
        "v2": apps.MobileNetV2,
        "large": apps.MobileNetV3Large,
        "small": apps.MobileNetV3Small,
    }
    shape = (size, size, 3)
    model = builders[app](input_shape=shape, alpha=alpha, weights=None, **kw)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # realistic BatchNorm statistics, so outputs are not ~0
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape
            stats = [rng.uniform(0.75, 1.25, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n)]
            layer.set_weights([*stats, rng.uniform(0.75, 1.25, n)])
    return model


def _save(model: "keras.Model", folder, fmt: str):
    if fmt == "h5":  # the legacy layout of the files keras.applications downloads
        path = folder / "model.h5"
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
    elif fmt == "weights.h5":
        path = folder / "model.weights.h5"
        model.save_weights(path)
    else:
        path = folder / "model.keras"
        model.save(path)
    return path


def _compare(kmodel, ours, size: int, scale_255: bool = False, features: bool = False):
    x = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    keras_in = (x + 1) * 127.5 if scale_255 else x  # V3's Rescaling: [0, 255] -> [-1, 1]
    expected = np.asarray(kmodel(keras_in, training=False).detach().cpu())
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        actual = ours.eval().forward_features(t) if features else ours.eval()(t)
    if features:
        actual = actual.permute(0, 2, 3, 1)
    assert np.abs(expected).max() > 1e-2  # real signals
    assert np.abs(expected - actual.numpy()).max() <= 1e-4


V1 = [(0.25, 32), (0.5, 40), (0.75, 32), (1.0, 40), (0.25, 57)]
V2 = [0.35, 0.5, 0.75, 1.0, 1.3, 1.4]
V3 = [
    (app, minimal, alpha)
    for app in ("large", "small")
    for minimal in (False, True)
    for alpha in (0.75, 1.0)
]


@pytest.mark.parametrize(("alpha", "size"), V1)
def test_keras_mobilenet_v1(alpha, size, tmp_path):
    kmodel = _build("v1", alpha, size, classifier_activation=None)
    path = _save(kmodel, tmp_path, FORMATS[V1.index((alpha, size)) % 3])
    model = create_model("mobilenet_v1", width_mult=alpha, weights=path)  # built as Keras'

    assert model.config.keras and model.config.padding == "same"
    _compare(kmodel, model, size)


@pytest.mark.parametrize("alpha", V2)
def test_keras_mobilenet_v2(alpha, tmp_path):
    kmodel = _build("v2", alpha, 32, classifier_activation=None)
    path = _save(kmodel, tmp_path, FORMATS[V2.index(alpha) % 3])
    model = create_model("mobilenet_v2", width_mult=alpha, keras=True)
    assert load_weights(model, path) == "keras"
    _compare(kmodel, model, 32)


@pytest.mark.parametrize(("app", "minimal", "alpha"), V3)
def test_keras_mobilenet_v3(app, minimal, alpha, tmp_path):
    rescale = V3.index((app, minimal, alpha)) % 2 == 0  # with Keras' Rescaling layer or not
    kmodel = _build(
        app,
        alpha,
        33 if minimal else 32,  # odd sizes: SAME padding where it depends on the size
        minimalistic=minimal,
        include_preprocessing=rescale,
        classifier_activation=None,
    )
    path = _save(kmodel, tmp_path, FORMATS[V3.index((app, minimal, alpha)) % 3])
    name = f"mobilenet_v3_{app}{'_minimal' if minimal else ''}"
    model = create_model(name, width_mult=alpha, weights=path)
    assert model.config.bn_eps == 1e-3 and model.eval_config.mean == (0.5, 0.5, 0.5)
    _compare(kmodel, model, 33 if minimal else 32, scale_255=rescale)


@pytest.mark.parametrize(("app", "name"), [("v2", "mobilenet_v2"), ("small", "mobilenet_v3_small")])
def test_without_top_any_number_of_classes(app, name, tmp_path):
    kmodel = _build(app, 1.0, 48, include_top=False)
    path = _save(kmodel, tmp_path, "keras")
    model = create_model(name, weights=path, num_classes=7)
    assert model.num_classes == 7
    _compare(kmodel, model, 48, scale_255=app == "small", features=True)


def test_legacy_full_model_h5_and_convert(tmp_path, capsys):
    kmodel = _build("v2", 0.5, 32, classifier_activation=None, classes=10)
    src, dst = tmp_path / "full.h5", tmp_path / "ours.safetensors"
    kmodel.save(src)  # the legacy whole-model .h5: weights under model_weights
    args = ["convert", str(src), str(dst), "--model", "mobilenet_v2", "--width-mult", "0.5"]
    assert main(args) == 0
    assert "Keras' build" in capsys.readouterr().out
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["keras"] is True
    assert json.loads(meta["preprocess"])["std"] == [0.5, 0.5, 0.5]
    _compare(kmodel, create_model("mobilenet_v2", weights=dst), 32)


def test_v1_keras_padding_differs_from_same_at_odd_sizes():
    """Keras' V1 pads its stride-2 depthwise convs ((0, 1), (0, 1)) at any size."""
    model = create_model("mobilenet_v1", width_mult=0.25, keras=True).eval()
    same = create_model("mobilenet_v1", width_mult=0.25, padding="same").eval()
    same.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 57, 57)
    with torch.no_grad():
        assert model.forward_features(x).shape[-1] == 1  # 29 -> 14 -> 7 -> 3 -> 1
        assert same.forward_features(x).shape[-1] == 2  # TF SAME: 29 -> 15 -> 8 -> 4 -> 2


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras")
    return _save(_build("v2", 0.5, 32), folder, "weights.h5")


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("mobilenet_v3_small", {"keras": True}, "a Keras MobileNetV2, not a mobilenet_v3_small"),
        ("mobilenet_v2", {"keras": True}, "does not fit mobilenet_v2 (width 1.0"),
        ("mobilenet_v2", {"width_mult": 0.5}, "needs keras=True"),
        ("mobilenet_v1_conv", {"width_mult": 0.5}, "Keras has no mobilenet_v1_conv"),
    ],
)
def test_a_file_for_another_model_is_refused(v2_file, name, kwargs, message):
    model = create_model(name, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=re.escape(message)) as error:
        load_weights(model, v2_file)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_another_v3_variant_is_refused(tmp_path):
    path = _save(_build("small", 1.0, 32, minimalistic=True), tmp_path, "h5")
    with pytest.raises(
        CheckpointError, match=r"do not fit mobilenet_v3_small .*(unexpected|missing)"
    ):
        load_weights(create_model("mobilenet_v3_small", keras=True), path)
    with pytest.raises(CheckpointError, match="do not fit mobilenet_v3_large_minimal"):
        load_weights(create_model("mobilenet_v3_large_minimal", keras=True), path)


def test_corrupt_files_are_refused_in_one_line(v2_file, tmp_path, capsys):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(v2_file.read_bytes()[:4096])
    empty = tmp_path / "other.h5"
    with h5py.File(empty, "w") as f:
        f["x"] = np.zeros(3)
    garbage = tmp_path / "garbage.keras"
    # a zip signature, then a ninth byte that would start a safetensors header
    garbage.write_bytes(b"PK\x03\x04" + bytes(4) + b"{" + os.urandom(200))
    for path, message in [
        (truncated, "not a readable Keras weights file"),
        (empty, "without Keras weights"),
        (garbage, "not a readable checkpoint"),
    ]:
        dst = tmp_path / "out.safetensors"
        assert main(["convert", str(path), str(dst), "--model", "mobilenet_v2"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not dst.exists()
