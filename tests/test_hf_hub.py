"""Checkpoints named by a Hugging Face Hub id (``hf-hub:timm/MODEL.TAG``), read offline from
a hub cache laid out as ``huggingface_hub`` writes it; every refusal is one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from PIL import Image
from timm.models._hub import save_for_hf

from mobilenet import CheckpointError, MobileNetError, create_model
from mobilenet.card import ModelCard
from mobilenet.cli import main
from mobilenet.data.preprocess import Preprocess
from mobilenet.data.published import KNOWN, TIMM_DEFAULTS
from mobilenet.models.layouts import TIMM_V3_MODELS
from mobilenet.models.pretrained import TIMM_MODELS, resolve_weights
from mobilenet.weights.hf_hub import read_hub_config
from mobilenet.weights.io import read_metadata

from .helpers import randomize_bn, recalibrate_bn, unit_scale_logits

COMMIT = "0123456789abcdef0123456789abcdef01234567"
V3 = "hf-hub:timm/mobilenetv3_large_100.ra_in1k"


def _git_blob_sha1(data: bytes) -> str:
    """The hub's ETag of a file kept in git (not LFS): its git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def put_in_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT):
    """Lay ``files`` out as huggingface_hub's cache does (file_download.py):
    ``models--ORG--NAME/blobs/<etag>``, ``snapshots/<commit>/<file> -> ../../blobs/<etag>``
    and ``refs/main`` holding the commit (no newline). LFS files (the weights) are named by
    their SHA-256, the others by their git blob id."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        lfs = not name.endswith(".json")
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / etag).write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache in a temporary HF_HOME, offline. huggingface_hub reads its
    environment when imported (its ``constants``), so they are set there too."""
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def timm_repo(hub_id: str, folder: Path, safe: bool | str = True, calibrate: bool = True):
    """What timm pushes for ``hub_id`` (its ``save_for_hf``: ``model.safetensors`` and
    ``config.json`` with the tag's ``pretrained_cfg``), from random weights whose every
    part shows in the outputs; returns the reference model and the repo's files."""
    name = hub_id.removeprefix("hf-hub:timm/")
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False)
    if calibrate:
        ref = recalibrate_bn(randomize_bn(ref), resolution=64)
        ref = unit_scale_logits(ref, ref.get_classifier())
    save_for_hf(ref.eval(), str(folder), safe_serialization=safe)
    return ref, {p.name: p.read_bytes() for p in folder.iterdir()}


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("hub_id", "ours", "width"),
    [
        (V3, "mobilenet_v3_large", 1.0),
        ("hf-hub:timm/tf_mobilenetv3_large_075.in1k", "mobilenet_v3_large", 0.75),
        ("hf-hub:timm/mobilenetv4_conv_small.e2400_r224_in1k", "mobilenet_v4_conv_small", 1.0),
    ],
)
def test_create_model_by_hub_id_gives_timm_outputs(hub_cache, tmp_path, hub_id, ours, width):
    ref, files = timm_repo(hub_id, tmp_path / "repo")
    put_in_cache(hub_cache, hub_id.removeprefix("hf-hub:"), files)
    model = create_model(ours, weights=hub_id).eval()
    assert model.config.width_mult == width
    # tf_ weights: TF's padding, told by the timm architecture in the file's path
    assert model.config.padding == ("same" if "/tf_" in hub_id else "symmetric")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = ref(x), model(x)
    assert expected.abs().max() > 1e-2
    assert (expected - actual).abs().max().item() <= 1e-5

    # The config's pretrained_cfg is the checkpoint's preprocessing, on the model and in
    # the card of the file it was loaded from.
    cfg = json.loads(files["config.json"])["pretrained_cfg"]
    size = cfg["input_size"][1]
    want = Preprocess(
        size,
        crop_pct=cfg["crop_pct"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        name=hub_id,
    )
    assert cfg["crop_mode"] == "center"
    assert model.preprocess == want
    path = resolve_weights(hub_id)
    card = ModelCard.read(read_metadata(path), str(path))
    assert card.preprocess == want and card.input_size == (size, size)
    assert card.config == {"name": ours, "width_mult": width, "num_classes": 1000}
    assert card.classes is None  # ImageNet's: its class names
    tag = hub_id.removeprefix("hf-hub:timm/")
    if tag in KNOWN:  # the published table agrees with timm's config
        assert KNOWN[tag].replace(name=hub_id) == want
    if "test_input_size" in cfg:
        test = Preprocess.from_json(card.extra["test_preprocess"], str(path))
        assert test.resolution == cfg["test_input_size"][1]
        assert test.crop_pct == cfg["test_crop_pct"]


def test_hub_file_is_written_once_and_keeps_the_source(hub_cache, tmp_path):
    _, files = timm_repo(V3, tmp_path / "repo", calibrate=False)
    repo = put_in_cache(hub_cache, "timm/mobilenetv3_large_100.ra_in1k", files)
    # the layout is huggingface_hub's own: its reader finds the files
    found = huggingface_hub.try_to_load_from_cache(V3.removeprefix("hf-hub:"), "model.safetensors")
    assert found == str(repo / "snapshots" / COMMIT / "model.safetensors")
    path = resolve_weights(V3)
    assert "mobilenetv3_large_100" in str(path.relative_to(os.environ["MOBILENET_HOME"]))
    stamp = path.stat().st_mtime_ns
    assert resolve_weights(V3) == path and path.stat().st_mtime_ns == stamp
    metadata = read_metadata(path)
    assert metadata["source"] == V3 and metadata["hub_commit"] == COMMIT
    # the expected SHA-256 is that of the repo's model.safetensors
    digest = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert resolve_weights(V3, sha256=digest[:12]) == path
    with pytest.raises(CheckpointError) as e:
        resolve_weights(V3, sha256="00000000")
    assert "not the expected 00000000" in _one_line(e)


def test_label_names_become_the_card_classes(hub_cache, tmp_path):
    _, files = timm_repo(
        "hf-hub:timm/mobilenetv3_small_100.lamb_in1k", tmp_path / "r", calibrate=False
    )
    config = json.loads(files["config.json"])
    config["num_classes"] = config["pretrained_cfg"]["num_classes"] = 3
    config["label_names"] = ["cat", "dog", "eel"]
    files["config.json"] = json.dumps(config).encode()
    tensors = _reclassify(files["model.safetensors"], 3)
    files["model.safetensors"] = tensors
    put_in_cache(hub_cache, "someone/pets", files)
    model = create_model("mobilenet_v3_small", weights="hf-hub:someone/pets")
    assert model.num_classes == 3
    path = resolve_weights("hf-hub:someone/pets")
    assert ModelCard.read(read_metadata(path), str(path)).classes == ("cat", "dog", "eel")


def _reclassify(data: bytes, classes: int) -> bytes:
    from safetensors.torch import load, save

    tensors = load(data)
    tensors["classifier.weight"] = tensors["classifier.weight"][:classes].clone()
    tensors["classifier.bias"] = tensors["classifier.bias"][:classes].clone()
    return save(tensors)


# --------------------------------------------------------------------------- the CLI


def _image_folder(root: Path) -> Path:
    """An ILSVRC-layout folder of two images of the first ImageNet class."""
    folder = root / "val" / "n01440764"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return root / "val"


def test_cli_eval_and_predict_with_hub_weights(hub_cache, tmp_path, capsys):
    hub_id = "hf-hub:timm/mobilenetv3_small_100.lamb_in1k"
    _, files = timm_repo(hub_id, tmp_path / "repo", calibrate=False)
    put_in_cache(hub_cache, hub_id.removeprefix("hf-hub:"), files)
    val = _image_folder(tmp_path)
    assert main(["eval", "--weights", hub_id, "--data", str(val), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["images"] == 2
    assert f"preprocess {hub_id}: crop_pct 0.875 (shorter side 256)" in err and "bicubic" in err
    image = str(val / "n01440764" / "0.png")
    assert main(["predict", "--weights", hub_id, image, "--json", "--engine", "eager"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(top) == 5 and all(entry["class"] for entry in top)
    # another architecture asked for: one line
    assert main(["eval", "--weights", hub_id, "--model", "mobilenet_v2", "--data", str(val)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds mobilenet_v3_small" in err and "not mobilenet_v2" in err


@pytest.mark.slow
def test_cli_reads_the_hub_cache_named_by_the_environment(hub_cache, tmp_path):
    """In a fresh process huggingface_hub takes HF_HUB_CACHE and HF_HUB_OFFLINE from the
    environment when imported."""
    hub_id = "hf-hub:timm/mobilenetv3_small_050.lamb_in1k"
    _, files = timm_repo(hub_id, tmp_path / "repo", calibrate=False)
    put_in_cache(hub_cache, hub_id.removeprefix("hf-hub:"), files)
    image = _image_folder(tmp_path) / "n01440764" / "1.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE set
    command = [sys.executable, "-m", "mobilenet", "predict", "--weights", hub_id, str(image)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "1.png" in result.stdout and "%" in result.stdout


# --------------------------------------------------------------------------- refusals


def test_offline_without_a_cached_file_is_one_line(hub_cache, tmp_path, capsys):
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenet_v3_large", weights=V3)
    assert _one_line(e) == (
        f"{V3}: config.json is not in the Hugging Face cache ({hub_cache}) and HF_HUB_OFFLINE "
        "is set: fetch it once online, or unset HF_HUB_OFFLINE"
    )
    assert main(["predict", "--weights", V3, str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"mobilenet predict: error: {e.value}"]
    # the config cached, the weights not
    _, files = timm_repo(V3, tmp_path / "repo", calibrate=False)
    put_in_cache(
        hub_cache, "timm/mobilenetv3_large_100.ra_in1k", {"config.json": files["config.json"]}
    )
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenet_v3_large", weights=V3)
    assert "model.safetensors is not in the Hugging Face cache" in _one_line(e)


def test_unreachable_hub_is_one_line(hub_cache, monkeypatch):
    """Online with nothing cached, when the hub cannot be reached: huggingface_hub raises
    LocalEntryNotFoundError from the connection's error (after its own retries, which a
    test does not wait for)."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as cause:
            raise LocalEntryNotFoundError("An error happened ... connection is on.") from cause

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(CheckpointError) as e:
        resolve_weights(V3)
    assert _one_line(e) == (
        f"{V3}: could not reach the Hugging Face Hub for config.json, and it is not in the "
        f"cache ({hub_cache}): [Errno 111] Connection refused"
    )


def test_unknown_model_is_one_line_naming_it(hub_cache, tmp_path):
    # a timm repo is refused by its name, before anything is fetched (nothing is cached)
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenet_v2", weights="hf-hub:timm/resnet50.a1_in1k")
    assert "timm's 'resnet50' is not a model this toolkit builds" in _one_line(e)
    # another repo, by its config's architecture
    _, files = timm_repo(V3, tmp_path / "repo", calibrate=False)
    config = json.loads(files["config.json"])
    config["architecture"] = "efficientnet_b0"
    put_in_cache(hub_cache, "someone/big", {**files, "config.json": json.dumps(config).encode()})
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenet_v3_large", weights="hf-hub:someone/big")
    assert "timm's 'efficientnet_b0' is not a model" in _one_line(e)


def test_another_architecture_is_one_line(hub_cache, tmp_path):
    _, files = timm_repo(V3, tmp_path / "repo", calibrate=False)
    put_in_cache(hub_cache, "timm/mobilenetv3_large_100.ra_in1k", files)
    with pytest.raises(CheckpointError) as e:
        resolve_weights(V3, model="mobilenet_v2")
    assert _one_line(e) == f"{V3} holds mobilenet_v3_large (width 1.0), not mobilenet_v2"
    with pytest.raises(CheckpointError) as e:  # create_model names the model it builds
        create_model("mobilenet_v2", weights=V3)
    assert _one_line(e) == f"{V3} holds mobilenet_v3_large (width 1.0), not mobilenet_v2"


def test_a_repo_with_only_a_pickle_is_one_line_and_never_unpickled(hub_cache, tmp_path):
    _, files = timm_repo(V3, tmp_path / "repo", safe=False, calibrate=False)
    assert set(files) == {"config.json", "pytorch_model.bin"}
    marker = tmp_path / "unpickled"
    files["pytorch_model.bin"] = _pickle_that_touches(marker)
    put_in_cache(hub_cache, "timm/mobilenetv3_large_100.ra_in1k", files)
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenet_v3_large", weights=V3)
    assert _one_line(e) == (
        f"{V3} has only pytorch_model.bin, a pickle, and pickled weights are not read from "
        "the hub: only its model.safetensors"
    )
    assert not marker.exists()
    # a pickle named model.safetensors is not read either
    files["model.safetensors"] = files.pop("pytorch_model.bin")
    put_in_cache(hub_cache, "timm/mobilenetv3_large_100.ra_in1k", files, commit="f" * 40)
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenet_v3_large", weights=V3)
    assert "model.safetensors is not a safetensors file, and nothing else is read" in _one_line(e)
    assert not marker.exists()


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _pickle_that_touches(path: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"conv_stem.weight": _Touch(path)}, buffer)
    return buffer.getvalue()


def _config(**changes) -> bytes:
    cfg = {
        "input_size": [3, 224, 224],
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 1000,
    }
    top = {"architecture": "mobilenetv3_large_100", "num_classes": 1000}
    for key, value in changes.items():
        (top if key in ("architecture", "num_classes", "label_names", "model_args") else cfg)[
            key
        ] = value
    return json.dumps({**top, "pretrained_cfg": cfg}).encode()


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (_config(input_size=[3, 10**9, 10**9]), "input_size 1000000000x1000000000 is not an"),
        (_config(input_size=[3, 224]), "input_size must be [3, height, width]"),
        (_config(input_size=[3, 224, 160]), "a classifier's input is square"),
        (_config(test_input_size=[3, 0, 0]), "test_input_size 0x0 is not an input size"),
        (_config(num_classes=10**12), "num_classes must be an integer in [1, 100000]"),
        (_config(num_classes=0), "num_classes must be an integer"),
        (_config(crop_pct=50), "crop_pct must be a number in (0, 1]"),
        (_config(crop_pct=10**400), "crop_pct must be a number in (0, 1]"),
        (_config(mean=[10**400, 0, 0]), "mean must be 3 numbers within +-1000"),
        (_config(input_size=[3, 10**400, 224]), "input_size 10000000000000000000x224 is not"),
        (_config(mean=[0.5, float("nan"), 0.5]), "mean must be 3 numbers"),
        (_config(std=[0.5, 0.0, 0.5]), "std must be 3 numbers > 0"),
        (_config(interpolation="lanczos"), "interpolation 'lanczos' is not one of"),
        (_config(crop_mode="squash"), "crop_mode 'squash': only 'center'"),
        (_config(label_names=["a", "b"]), "label_names must be 1000 names"),
        (_config(architecture="../../etc/passwd"), "names no timm architecture"),
        (_config(model_args={"act_layer": "relu"}), "model_args act_layer change timm's model"),
        (_config(model_args={"in_chans": 1}), "model_args in_chans 1"),
        (b"[" * 100_000, "is not JSON"),
        (b"\xff\xfe", "is not JSON"),
        (b"[1, 2]", "is not a JSON object"),
    ],
)
def test_a_hostile_config_is_one_line(config, why):
    with pytest.raises(CheckpointError) as e:
        read_hub_config(config, "hf-hub:x/y")
    message = _one_line(e)
    assert message.startswith("hf-hub:x/y: config.json ") and why in message


def test_absurd_sizes_in_a_cached_config_are_one_line(hub_cache, tmp_path):
    _, files = timm_repo(V3, tmp_path / "repo", calibrate=False)
    config = json.loads(files["config.json"])
    config["pretrained_cfg"]["input_size"] = [3, 2**40, 2**40]
    files["config.json"] = json.dumps(config).encode()
    put_in_cache(hub_cache, "timm/mobilenetv3_large_100.ra_in1k", files)
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenet_v3_large", weights=V3)
    assert "input_size 1099511627776x1099511627776 is not an input size" in _one_line(e)


def test_an_empty_config_is_one_line(hub_cache):
    put_in_cache(hub_cache, "timm/mobilenetv3_large_100.ra_in1k", {"config.json": b"{}"})
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenet_v3_large", weights=V3)
    assert "config.json names no timm architecture" in _one_line(e)


def test_bad_hub_ids_and_a_missing_hub_library_are_one_line(hub_cache, monkeypatch):
    for spec in ("hf-hub:", "hf-hub:timm", "hf-hub:timm/../x", "hf-hub:a/b@c@d", "hf-hub:/x"):
        with pytest.raises(MobileNetError) as e:
            resolve_weights(spec)
        assert "is not a hub id: hf-hub:ORG/NAME" in _one_line(e)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MobileNetError) as e:
        resolve_weights(V3)
    assert _one_line(e) == (
        'hf-hub: checkpoints need huggingface_hub: pip install "mobilenet[hub]"'
    )


def test_timm_names_map_to_ours_as_the_other_tables_say():
    for (model, width), tag in TIMM_DEFAULTS.items():
        assert TIMM_MODELS[tag.partition(".")[0]] == (model, width)
    assert set(TIMM_V3_MODELS) <= set(TIMM_MODELS)
    assert TIMM_MODELS["tf_mobilenetv3_small_minimal_100"] == ("mobilenet_v3_small_minimal", 1.0)
    for timm_name, (model, width) in TIMM_MODELS.items():
        assert timm.is_model(timm_name), timm_name
        with torch.device("meta"):  # shapes only
            create_model(model, width_mult=width)  # a width our builder takes
