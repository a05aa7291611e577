"""Our safetensors files carry the SHA-256 of their bytes: a changed weight is refused in
one line, and a file without a digest loads with a one-line note."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from mobilenet import create_model
from mobilenet.cli import main
from mobilenet.errors import CheckpointError
from mobilenet.integrity import MARKER
from mobilenet.weights import read_checkpoint, save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = create_model("mobilenet_v3_small", width_mult=0.25, num_classes=10)
    return save_weights(model, tmp_path_factory.mktemp("w") / "model.safetensors")


def test_a_file_we_write_is_sealed_and_loads_without_a_note(weights):
    assert weights.read_bytes().count(MARKER.encode()) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state_dict, metadata = read_checkpoint(weights)
    assert metadata["digest"].startswith(MARKER) and "classifier.weight" in state_dict


def test_a_changed_weight_is_refused(weights, tmp_path, capsys):
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a bit of the last tensor's last value
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged: its bytes do not match the digest"):
        read_checkpoint(damaged)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40)).save(image)
    assert main(["predict", "--weights", str(damaged), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged" in err, err


def test_a_file_without_a_digest_loads_with_one_note(weights, tmp_path):
    state_dict, metadata = read_checkpoint(weights)
    del metadata["digest"]
    old = tmp_path / "old.safetensors"
    save_file(state_dict, str(old), metadata=metadata)
    with pytest.warns(UserWarning, match="carries no digest") as caught:
        loaded, _ = read_checkpoint(old)
    assert len(caught) == 1 and torch.equal(
        loaded["classifier.bias"], state_dict["classifier.bias"]
    )


def test_others_files_load_without_a_note(weights, tmp_path):
    state_dict, _ = read_checkpoint(weights)
    foreign = tmp_path / "timm.safetensors"
    save_file(state_dict, str(foreign), metadata={"source": json.dumps("elsewhere")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_checkpoint(foreign)
