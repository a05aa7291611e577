"""ImageNet-style evaluation: ILSVRC folders (one per WordNet id) map to the 1,000 classes
in torchvision's order, even when only some are present; the preprocessing a checkpoint
keeps is used, reported in one line, stored by save/convert/export, and overridable;
bad input is one line and a non-zero exit."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import mobilenet
from mobilenet.cli import main
from mobilenet.data.imagenet import imagenet_names, imagenet_wnids, is_imagenet
from mobilenet.data.published import KNOWN
from mobilenet.weights.io import read_metadata

# (class index, images): a subset of ImageNet's folders, far from the first indices.
FOLDERS = [(1, 1), (500, 2), (999, 3)]
TOP, SECOND = 500, 999  # the controlled model's first and second choice, whatever the image


def test_classes_are_torchvisions_in_sorted_wnid_order():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    wnids = imagenet_wnids()
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert wnids[:2] == ["n01440764", "n01443537"] and wnids[-1] == "n15075141"
    assert imagenet_names() == list(_IMAGENET_CATEGORIES)
    assert is_imagenet(imagenet_names()) and is_imagenet(wnids)
    assert not is_imagenet([str(i) for i in range(1000)])


def test_wnids_match_timms_synsets():
    timm = pytest.importorskip("timm")
    info = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    assert imagenet_wnids() == info.read_text().split()


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory) -> Path:
    """A 1,000-class model whose logits are the classifier's bias (every weight zero), its
    file without class names, and an ILSVRC-layout folder with three of the 1,000."""
    root = tmp_path_factory.mktemp("imagenet")
    model = mobilenet.create_model("mobilenet_v3_small", width_mult=0.25).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.classifier.bias[TOP], model.classifier.bias[SECOND] = 5.0, 4.0
        model.classifier.bias[FOLDERS[0][0]] = -1.0  # last, not among the tied zeros
    mobilenet.save_weights(model, root / "in1k.safetensors")
    wnids = imagenet_wnids()
    for index, count in FOLDERS:
        folder = root / "val" / wnids[index]
        folder.mkdir(parents=True)
        for k in range(count):
            Image.new("RGB", (300, 200), (40 * k, index % 256, 9)).save(folder / f"{k}.JPEG")
    return root


def _eval(run: Path, *flags: str, capsys) -> tuple[int, dict, str]:
    code = main(["eval", "--weights", str(run / "in1k.safetensors"), "--data",
                 str(run / "val"), "--json", *flags])  # fmt: skip
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else {}, err


def test_a_subset_of_wnid_folders_keeps_the_1000_class_indices(imagenet_run, capsys):
    code, metrics, err = _eval(imagenet_run, capsys=capsys)
    assert code == 0
    # Every image is called class 500 (then 999): right for the 2 of that folder only.
    assert metrics["images"] == 6
    assert metrics["top1"] == pytest.approx(100 * 2 / 6)
    assert metrics["top5"] == pytest.approx(100 * 5 / 6)  # 500 and 999 in the top 5
    assert err.count("\n") == 1 and err.startswith("preprocess ours: shorter side 256")


def test_predict_names_imagenet_classes(imagenet_run, capsys):
    image = next((imagenet_run / "val").rglob("*.JPEG"))
    args = ["predict", "--weights", str(imagenet_run / "in1k.safetensors"), str(image)]
    assert main([*args, "--top", "2", "--engine", "eager", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert [t["class"] for t in top] == [imagenet_names()[TOP], imagenet_names()[SECOND]]


def test_an_unknown_folder_is_refused_in_one_line(imagenet_run, tmp_path, capsys):
    val = tmp_path / "val"
    (val / imagenet_wnids()[3]).mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(val / imagenet_wnids()[3] / "a.png")
    (val / "cats").mkdir()
    Image.new("RGB", (64, 64)).save(val / "cats" / "a.png")
    code = main(["eval", "--weights", str(imagenet_run / "in1k.safetensors"), "--data", str(val)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "cats: not an ImageNet-1k WordNet id" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_flags_override_and_name_the_preprocessing(imagenet_run, capsys):
    flags = ["--preprocess", "mobilenet_v2.tv2_in1k", "--crop-pct", "0.9", "--mean", "0.5",
             "0.5", "0.5"]  # fmt: skip
    code, _, err = _eval(imagenet_run, *flags, capsys=capsys)
    assert code == 0
    assert err.startswith("preprocess mobilenet_v2.tv2_in1k with --mean --crop-pct: crop_pct 0.9")
    assert "mean (0.5, 0.5, 0.5)" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--crop-pct", "0.9", "--resize", "256"], "--crop-pct and --resize both"),
        (["--resize", "100"], "resize must be an integer >= the crop (224)"),
        (["--preprocess", "nope"], "unknown preprocessing 'nope'"),
        (["--crop-pct", "1.5"], "must be in (0, 1]"),
        (["--std", "1", "0", "1"], "must be > 0"),
    ],
)
def test_bad_flags_are_one_line(imagenet_run, flags, message, capsys):
    try:
        code, _, err = _eval(imagenet_run, *flags, capsys=capsys)
    except SystemExit as e:  # argparse's own refusals
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_preprocess_flags_refused_for_a_detector(tmp_path, capsys):
    code = main(["eval", "--model", "ssdlite_mobilenet_v3_small", "--weights", "x.safetensors",
                 "--data", "mnist-det", "--crop-pct", "0.9"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--crop-pct applies to classification models" in err


def test_damaged_preprocess_metadata_is_one_line(imagenet_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from mobilenet.weights import sealed_safetensors

    src = imagenet_run / "in1k.safetensors"
    bad = tmp_path / "bad.safetensors"
    meta = {**read_metadata(src), "preprocess": '{"mean": [0.5, 0.5], "std": [1, 1, 1]}'}
    bad.write_bytes(sealed_safetensors(load_file(src), meta))
    code = main(["eval", "--weights", str(bad), "--data", str(imagenet_run / "val")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "metadata 'preprocess' is damaged: preprocess mean must be 3 numbers" in err


def test_convert_and_save_keep_torchvisions_preprocessing(tmp_path, capsys):
    from torchvision.models import mobilenet_v3_small

    source = tmp_path / "mobilenet_v3_small-047dcff4.pth"  # torchvision's own file name
    torch.save(mobilenet_v3_small().state_dict(), source)
    model = mobilenet.create_model("mobilenet_v3_small", weights=str(source))
    assert model.preprocess == KNOWN["mobilenet_v3_small.tv_in1k"]
    dst = tmp_path / "mine.safetensors"
    assert main(["convert", str(source), str(dst), "--model", "mobilenet_v3_small"]) == 0
    assert json.loads(read_metadata(dst)["preprocess"])["resize"] == 256
    reloaded = mobilenet.create_model("mobilenet_v3_small", weights=str(dst))
    assert reloaded.preprocess == model.preprocess
    # A torchvision file under another name: torchvision's V1 transform; timm: its default tag.
    renamed = tmp_path / "v3s.pth"
    renamed.write_bytes(source.read_bytes())
    assert mobilenet.create_model("mobilenet_v3_small", weights=str(renamed)).preprocess.name == (
        "torchvision"
    )


def test_export_keeps_the_preprocessing(imagenet_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    weights = str(imagenet_run / "in1k.safetensors")
    args = ["export", "--model", "mobilenet_v3_small", "--weights", weights, "--out", str(out),
            "--resolution", "64"]  # fmt: skip
    assert main([*args, "--preprocess", "keras"]) == 0
    assert "preprocess keras: crop_pct 0.875 (shorter side 73), centre crop 64" in (
        capsys.readouterr().err
    )
    from mobilenet.classification.predict import load_trained

    trained = load_trained(str(out))
    assert trained.eval_preprocess() == KNOWN["keras"].at(64)
    assert trained.classes == imagenet_names()
    assert main(["export", *args[1:], "--format", "torchscript", "--crop-pct", "0.9"]) == 2
    assert "a torchscript file keeps no metadata" in capsys.readouterr().err


def test_timm_files_take_their_default_tag_and_tf_ones_inception_scaling(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    cases = [("mobilenetv2_100", "mobilenet_v2", "mobilenetv2_100.ra_in1k")]
    cases.append(("tf_mobilenetv3_small_100", "mobilenet_v3_small", None))
    for arch, ours, tag in cases:
        path = tmp_path / f"{arch}.safetensors"
        save_file(timm.create_model(arch).state_dict(), path)
        origin = {"origin": f"timm:{arch}"} if arch.startswith("tf_") else {}
        p = mobilenet.create_model(ours, weights=str(path), **origin).preprocess
        if tag is not None:
            assert p == KNOWN[tag]
        else:  # the authors' TF weights: inputs in [-1, 1], as timm's pretrained_cfg says
            cfg = timm.models.get_pretrained_cfg(arch)
            assert (p.mean, p.std, p.interpolation) == (cfg.mean, cfg.std, cfg.interpolation)
            assert p.crop_pct == cfg.crop_pct


def test_quantize_calibrates_on_an_ilsvrc_folder(imagenet_run, tmp_path):
    out = tmp_path / "int8.safetensors"
    args = ["quantize", "--weights", str(imagenet_run / "in1k.safetensors"), "--data",
            str(imagenet_run / "val"), "--calibration-images", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0 and out.is_file()
