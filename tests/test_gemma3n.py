"""Gemma 3n's vision tower read from a sharded Transformers checkpoint: only the tower's
shards opened and only its tensors read, timm's outputs, the card's preprocessing, and
each refusal in one line with nothing loaded.

The shards are built here from timm's ``mobilenetv5_300m_enc`` (random weights, norm
scales, layer scales and biases) at channel multiplier 0.05: every block of Gemma 3n's
encoder, 8 to 64 channels wide (5.8M parameters, not 294M), beside fake language-model
tensors under Transformers' names. Shards holding only the language model are not
safetensors at all, and one shard declares embedding tables of Gemma 3n's size (5.8 GB,
sparse on disk): reading any of them would fail the test. The full-size encoder is the
``slow`` test.
"""

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from mobilenet import create_model, load_weights
from mobilenet.card import ModelCard
from mobilenet.data.preprocess import Preprocess
from mobilenet.errors import CheckpointError
from mobilenet.models.v5_layouts import GEMMA_PREFIX
from mobilenet.weights import gemma3n, read_checkpoint
from mobilenet.weights.gemma3n import INDEX_FILE, VISION_PREFIX
from mobilenet.weights.io import read_metadata

from .helpers import randomize_v5

WIDTH = 0.05  # timm's channel_multiplier and our width_mult
SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
TOWER_SHARDS = SHARDS[1:3]  # the others hold the language model only
# Transformers' image processor for Gemma 3n: 768x768, bilinear, pixels in [0, 1]
GEMMA_PREPROCESS = Preprocess(
    768,
    crop_pct=1.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    interpolation="bilinear",
    name="gemma3n (transformers)",
)
# Embedding tables of Gemma 3n's size (Transformers' Gemma3nTextConfig defaults: 262,400
# x 2048, and 262,144 x 35 layers x 256), bf16: 5.8 GB declared, never written (sparse).
HUGE = {
    "model.language_model.embed_tokens.weight": ("BF16", [262_400, 2048]),
    "model.language_model.embed_tokens_per_layer.weight": ("BF16", [262_144, 35 * 256]),
}


def _tower(name: str = "mobilenetv5_300m_enc", width: float = WIDTH) -> nn.Module:
    """timm's encoder with random norm scales, layer scales and biases, so that every
    tensor shows in the output."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, channel_multiplier=width, num_classes=0)
    return randomize_v5(model)


def _language_model() -> dict[str, torch.Tensor]:
    """Small stand-ins for the language model's, the audio tower's and the vision
    embedder's tensors (the embedder is not the tower: Gemma3nMultimodalEmbedder)."""
    names = [f"model.language_model.layers.{i}.mlp.{p}.weight" for i in range(4) for p in "ud"]
    names += ["model.audio_tower.conformer.0.attention.weight", "model.embed_vision.weight"]
    names += ["model.language_model.norm.weight", "lm_head.weight"]
    return {name: torch.full((4, 4), float(i)) for i, name in enumerate(names)}


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], huge=None) -> None:
    """``tensors`` as safetensors, plus tensors ``huge`` declares (name: dtype, shape)
    and whose data is a hole: the file is extended, sparse, to the size its header says."""
    data = save(tensors, metadata={"format": "pt"})
    size = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + size]), data[8 + size :]
    end = len(body)
    for name, (dtype, shape) in (huge or {}).items():
        length = 2 * shape[0] * shape[1]  # bf16
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + length]}
        end += length
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + body)
        f.truncate(8 + len(text) + end)


def _write_checkpoint(folder: Path, tower: dict[str, torch.Tensor], huge=None) -> Path:
    """A Transformers-style sharded checkpoint: the tower over the two middle shards,
    the language model over all four; the first and last hold it alone and are junk."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = {VISION_PREFIX + k: v.contiguous() for k, v in tower.items()}
    names, lm = sorted(vision), _language_model()
    lm_names, half = sorted(lm), len(names) // 2
    parts = [lm_names[i::4] for i in range(4)]
    weight_map = {}
    for shard, keys in zip(SHARDS, [[], names[:half], names[half:], []], strict=True):
        weight_map |= dict.fromkeys(keys, shard)
    for shard, keys in zip(SHARDS, parts, strict=True):
        weight_map |= dict.fromkeys(keys, shard)
    for shard in (SHARDS[0], SHARDS[3]):  # reading these would fail
        (folder / shard).write_bytes(b"not read: the language model only" * 100)
    _write_shard(
        folder / SHARDS[1],
        {k: vision[k] for k in names[:half]} | {k: lm[k] for k in parts[1]},
        {**HUGE, **(huge or {})},
    )
    weight_map |= dict.fromkeys(HUGE, SHARDS[1]) | dict.fromkeys(huge or {}, SHARDS[1])
    _write_shard(
        folder / SHARDS[2], {k: vision[k] for k in names[half:]} | {k: lm[k] for k in parts[2]}
    )
    index = {"metadata": {"total_size": 5_000_000_000}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return folder


class _Spy:
    """``safe_open`` recording the shards opened and the tensors read, refusing to give
    any tensor outside the vision tower."""

    opened: list[str]
    read: list[str]

    def __init__(self, path: str, framework: str) -> None:
        type(self).opened.append(Path(path).name)
        self.handle = safe_open(path, framework=framework)

    def __enter__(self):
        self.file = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_slice(self, key: str):
        assert key.startswith(VISION_PREFIX), key
        return self.file.get_slice(key)

    def get_tensor(self, key: str) -> torch.Tensor:
        assert key.startswith(VISION_PREFIX), key
        type(self).read.append(key)
        return self.file.get_tensor(key)


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setattr(_Spy, "opened", [], raising=False)
    monkeypatch.setattr(_Spy, "read", [], raising=False)
    monkeypatch.setattr(gemma3n, "safe_open", _Spy)
    return _Spy


@pytest.fixture(scope="module")
def tower() -> nn.Module:
    return _tower()


@pytest.fixture
def folder(tmp_path, tower) -> Path:
    return _write_checkpoint(tmp_path / "gemma-3n", tower.state_dict())


def _assert_same(ref: nn.Module, model: nn.Module, sizes) -> None:
    """The MSFA maps agree to 1e-4 of outputs of unit scale."""
    for height, width in sizes:
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected, actual = ref(x), model(x)
        assert expected.shape == actual.shape == (2, 2048, 16, 16)
        assert expected.abs().max() > 1e-2  # real signals, not zeros
        scale = max(1.0, expected.abs().max().item())
        assert (expected - actual).abs().max().item() <= 1e-4 * scale


def test_create_model_reads_only_the_towers_tensors_and_gives_timms_outputs(folder, tower, spy):
    model = create_model("mobilenet_v5_300m_enc", weights=folder, width_mult=WIDTH).eval()
    # Two passes over the tower's shards (sizes from the headers, then the tensors); the
    # junk shards and the 5.8 GB of declared embeddings are never touched.
    assert sorted(set(spy.opened)) == TOWER_SHARDS
    assert sorted(spy.read) == sorted(VISION_PREFIX + k for k in tower.state_dict())
    assert model.preprocess == GEMMA_PREPROCESS  # the card's, travelling with the weights
    _assert_same(tower, model, [(64, 64), (96, 72)])


def test_index_file_load_weights_and_read_checkpoint(folder, tower):
    model = create_model("mobilenet_v5_300m_enc", width_mult=WIDTH)
    assert load_weights(model, folder / INDEX_FILE) == "timm"
    _assert_same(tower, model.eval(), [(64, 64)])
    state_dict, metadata = read_checkpoint(folder)
    assert set(state_dict) == set(tower.state_dict())  # the prefix stripped
    assert metadata == read_metadata(folder) == read_metadata(folder / INDEX_FILE)
    assert VISION_PREFIX == GEMMA_PREFIX  # the V5 layout's name for it


def test_the_cards_preprocessing_is_transformers_gemma3n_image_processors(folder):
    card = ModelCard.read(read_metadata(folder), str(folder))
    assert card.preprocess == GEMMA_PREPROCESS
    assert card.input_size == (768, 768) and card.task == "classification"
    assert card.extra["source"] == str(folder / INDEX_FILE)


def test_bfloat16_shards_load_as_their_float32_values(tmp_path, tower):
    rounded = copy.deepcopy(tower)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    state = {k: v.to(torch.bfloat16) for k, v in tower.state_dict().items()}
    folder = _write_checkpoint(tmp_path / "bf16", state)
    model = create_model("mobilenet_v5_300m_enc", weights=folder, width_mult=WIDTH).eval()
    assert {v.dtype for v in model.state_dict().values()} == {torch.float32}
    _assert_same(rounded, model, [(64, 64)])


def _rewrite_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX_FILE).read_text())
    change(index["weight_map"])
    (folder / INDEX_FILE).write_text(json.dumps(index))


def _no_tower(folder: Path) -> None:
    _rewrite_index(folder, lambda m: [m.pop(k) for k in list(m) if k.startswith(VISION_PREFIX)])


def _cut(name: str, keep: int | None):
    def cut(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep] if keep is not None else data[:-100])

    return cut


def _outside(name: str):
    def point(folder: Path) -> None:
        (folder.parent / SHARDS[2]).write_bytes((folder / SHARDS[2]).read_bytes())
        (folder / "sub").mkdir()
        (folder / "sub" / SHARDS[2]).write_bytes((folder / SHARDS[2]).read_bytes())
        _rewrite_index(folder, lambda m: m.update(dict.fromkeys(_in(m, SHARDS[2]), name)))

    return point


def _in(weight_map: dict[str, str], shard: str) -> list[str]:
    return [k for k, v in weight_map.items() if v == shard and k.startswith(VISION_PREFIX)]


def _misplaced(folder: Path) -> None:
    _rewrite_index(folder, lambda m: m.update(dict.fromkeys(_in(m, SHARDS[1])[:3], SHARDS[2])))


def _remove(name: str):
    return lambda folder: (folder / name).unlink()


REFUSALS = [
    pytest.param(_no_tower, "no vision tower: none of its 14 tensors", id="no-vision-tower"),
    pytest.param(_cut(SHARDS[2], None), "incomplete metadata", id="truncated-data"),
    pytest.param(_cut(SHARDS[2], 20), "invalid header length", id="truncated-header"),
    pytest.param(_cut(SHARDS[2], 5), "header too small", id="truncated-length"),
    pytest.param(_remove(SHARDS[2]), f"names shard {SHARDS[2]}, which is not a file", id="missing"),
    pytest.param(_remove(INDEX_FILE), f"holds no {INDEX_FILE}", id="no-index"),
    pytest.param(_outside(f"../{SHARDS[2]}"), "not a plain .safetensors file", id="parent"),
    pytest.param(_outside(f"sub/{SHARDS[2]}"), "not a plain .safetensors file", id="sub-folder"),
    pytest.param(_outside(f"/tmp/{SHARDS[2]}"), "not a plain .safetensors file", id="absolute"),
    pytest.param(_outside(f"..\\{SHARDS[2]}"), "not a plain .safetensors file", id="backslash"),
    pytest.param(
        _misplaced, "holds no 'model.vision_tower.timm_model.", id="tensor-not-in-its-shard"
    ),
]


@pytest.mark.parametrize(("damage", "message"), REFUSALS)
def test_refusals_are_one_line_and_load_nothing(tmp_path, tower, damage, message):
    folder = _write_checkpoint(tmp_path / "gemma-3n", tower.state_dict())
    damage(folder)
    _assert_refused(folder, message)


_NETS: dict[str, nn.Module] = {}  # one model per name, which every refusal leaves as it is


def _assert_refused(folder: Path, message: str, model: str = "mobilenet_v5_300m_enc") -> None:
    with pytest.raises(CheckpointError) as error:
        create_model(model, weights=folder, width_mult=WIDTH)
    assert message in str(error.value) and "\n" not in str(error.value)
    if model not in _NETS:
        _NETS[model] = create_model(model, width_mult=WIDTH, num_classes=0)
    net = _NETS[model]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_weights(net, folder)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_damaged_or_oversized_index_is_refused(tmp_path, tower, monkeypatch):
    folder = _write_checkpoint(tmp_path / "gemma-3n", tower.state_dict())
    index = folder / INDEX_FILE
    good = index.read_text()
    for text, message in [
        ('{"weight_map": ', "not a JSON index"),
        ('["weight_map"]', "not a JSON index"),
        ('{"weight_map": {}}', "holds no 'weight_map'"),
        ('{"weight_map": {"a": 3}}', "maps names to something else"),
    ]:
        index.write_text(text)
        _assert_refused(folder, message)
    index.write_text(good)
    monkeypatch.setattr(gemma3n, "MAX_INDEX_BYTES", len(good) - 1)
    _assert_refused(folder, "not a sharded checkpoint's index")


def test_a_huge_declared_tower_is_refused_before_it_is_read(tmp_path, tower, spy):
    huge = {VISION_PREFIX + "blocks.9.9.conv.weight": ("BF16", [1 << 20, 4096])}  # 8 GiB
    folder = _write_checkpoint(tmp_path / "gemma-3n", tower.state_dict(), huge)
    _assert_refused(folder, "its vision tower declares 8.0 GiB of tensors")
    assert spy.read == []


def test_a_tower_of_another_size_is_refused_naming_the_model_it_fits(tmp_path, tower):
    base = _write_checkpoint(tmp_path / "base", _tower("mobilenetv5_base").state_dict())
    _assert_refused(base, "a timm mobilenetv5_base state dict does not fit mobilenet_v5_300m_enc")
    folder = _write_checkpoint(tmp_path / "300m", tower.state_dict())
    fits = "it fits mobilenet_v5_300m or mobilenet_v5_300m_enc"
    _assert_refused(folder, fits, "mobilenet_v5_base")


def test_a_sha256_is_refused_for_a_sharded_checkpoint(folder):
    for path in (folder, folder / INDEX_FILE):
        with pytest.raises(CheckpointError, match="an expected SHA-256 checks a single file"):
            create_model("mobilenet_v5_300m_enc", weights=path, sha256="0" * 64)


@pytest.mark.slow
def test_full_size_encoder_from_bfloat16_shards(tmp_path):
    """Gemma 3n's encoder at full size (294M parameters), stored as bfloat16 as Gemma 3n's
    checkpoints are; built at width 1.0 as ``create_model`` does by default."""
    ref = _tower(width=1.0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    state = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    folder = _write_checkpoint(tmp_path / "gemma-3n", state)
    del state
    model = create_model("mobilenet_v5_300m_enc", weights=folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 294_126_912
    _assert_same(ref, model, [(64, 64)])
