"""Knowledge distillation: the loss against its closed form and its known gradient, the
teacher loaded from any file ``eval`` reads (frozen, converted to its own preprocessing),
the refusals of a teacher that does not fit the data, and feature distillation."""

import math

import pytest
import torch
import torch.nn.functional as F

from mobilenet import MobileNetError, create_model
from mobilenet.card import ModelCard
from mobilenet.classification.distill import (
    FeatureDistilled,
    Teacher,
    check_kd,
    distillation_loss,
    feature_channels,
    kd_loss,
    load_teacher,
)
from mobilenet.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from mobilenet.weights import save_weights

from .helpers import randomize_bn

RES = 32
CPU = torch.device("cpu")
CLASSES = [f"c{i}" for i in range(10)]


def _model(num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", width_mult=0.35, num_classes=num_classes)
    return randomize_bn(model, seed).eval()


def _save(model, path, classes=None, resolution=RES, preprocess=None):
    """``model`` as our safetensors with its card (classes, input size, preprocessing)."""
    card = ModelCard(
        classes=None if classes is None else tuple(classes),
        input_size=(resolution, resolution),
        preprocess=preprocess,
    )
    return str(save_weights(model, path, card.metadata()))


def _one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message and "--teacher" in message, message
    for part in parts:
        assert part in message, message
    return message


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_is_the_closed_form_and_its_gradient_the_known_one(temperature):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 5, generator=g) * 3).requires_grad_(True)
    t = torch.randn(6, 5, generator=g) * 3
    T = temperature
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    p_s = torch.exp(s / T) / torch.exp(s / T).sum(1, keepdim=True)
    by_hand = T * T * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(1).mean()
    loss = kd_loss(s, t, T)
    assert torch.allclose(loss, by_hand, atol=1e-5), (loss, by_hand)
    loss.backward()
    expected = T * (p_s - p_t).detach() / len(s)
    assert torch.allclose(s.grad, expected, atol=1e-6)
    assert kd_loss(t, t, T).abs() < 1e-6  # a student equal to its teacher has nothing to learn


def test_distillation_loss_mixes_the_task_and_the_teacher():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    task = F.cross_entropy(s, torch.tensor([0, 1, 2, 3]))
    kd = kd_loss(s, t, 2.0)
    assert torch.equal(distillation_loss(task, s, t, 0.0, 2.0), task)
    assert torch.allclose(distillation_loss(task, s, t, 1.0, 2.0), kd)
    assert torch.allclose(distillation_loss(task, s, t, 0.25, 2.0), 0.75 * task + 0.25 * kd)
    with pytest.raises(MobileNetError, match="differ"):
        kd_loss(s, t[:, :5], 1.0)


@pytest.mark.parametrize(
    ("alpha", "temperature", "flag"),
    [(-0.1, 1.0, "--kd-alpha"), (1.5, 1.0, "--kd-alpha"), (math.nan, 1.0, "--kd-alpha"),
     (0.5, 0.0, "--kd-temperature"), (0.5, -2.0, "--kd-temperature"),
     (0.5, math.inf, "--kd-temperature"), (0.5, math.nan, "--kd-temperature")],
)  # fmt: skip
def test_check_kd_refuses_in_one_line(alpha, temperature, flag):
    check_kd(0.0, 1.0)
    check_kd(1.0, 20.0)
    with pytest.raises(MobileNetError) as e:
        check_kd(alpha, temperature)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- the teacher


def test_a_safetensors_teacher_is_frozen_and_gives_the_models_logits(tmp_path):
    net = _model()
    path = _save(net, tmp_path / "teacher.safetensors", CLASSES)
    teacher = load_teacher(path, None, 10, CLASSES, CPU)
    assert isinstance(teacher, Teacher) and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    images = torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net(images)
    logits = teacher(images)
    assert torch.equal(logits, expected) and logits.grad_fn is None
    assert teacher.calls == 1 and teacher.seconds > 0

    # One training step of a student taught by it: the teacher is untouched.
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student = _model(seed=1).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    targets = torch.tensor([0, 1, 2, 3])
    logits = student(images)
    task = F.cross_entropy(logits, targets)
    distillation_loss(task, logits, teacher(images), 0.5, 4.0).backward()
    optimizer.step()
    assert not teacher.model.training and teacher.calls == 2
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in teacher.model.parameters())


def test_a_teacher_takes_the_students_batches_in_its_own_preprocessing(tmp_path):
    """Another normalisation and input size: the batch is un-normalised, resized
    (bilinear, antialiased) and normalised as the teacher's."""
    net = _model()
    keras = Preprocess(48, mean=(0.5,) * 3, std=(0.5,) * 3)
    path = _save(net, tmp_path / "t.safetensors", CLASSES, resolution=48, preprocess=keras)
    teacher = load_teacher(path, None, 10, CLASSES, CPU, IMAGENET_MEAN, IMAGENET_STD)
    pixels = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(3))
    mean, std = (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    )
    resized = F.interpolate(pixels, (48, 48), mode="bilinear", antialias=True)
    with torch.no_grad():
        expected = net((resized - 0.5) / 0.5)
    assert torch.allclose(teacher((pixels - mean) / std), expected, atol=1e-5)


def test_an_onnx_teacher_runs_on_its_engine_with_the_models_logits(tmp_path):
    pytest.importorskip("onnxruntime")
    from mobilenet.export import export_onnx

    net = _model()
    card = ModelCard(classes=tuple(CLASSES))
    export_onnx(
        _model(), tmp_path / "t.onnx", RES, metadata={"classes": card.metadata()["classes"]}
    )
    teacher = load_teacher(str(tmp_path / "t.onnx"), None, 10, CLASSES, CPU)
    assert teacher.exported
    images = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = net(images)
    assert (teacher(images) - expected).abs().max() < 1e-4
    with pytest.raises(MobileNetError, match="feature distillation needs a PyTorch teacher"):
        teacher.features(images)
    with pytest.raises(MobileNetError, match="feature distillation needs a PyTorch teacher"):
        feature_channels(teacher)


def test_a_teacher_that_does_not_fit_is_refused_in_one_line(tmp_path):
    missing = str(tmp_path / "nowhere.safetensors")
    with pytest.raises(MobileNetError) as e:
        load_teacher(missing, None, 10, CLASSES, CPU)
    _one_line(e, missing)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model")
    with pytest.raises(MobileNetError) as e:
        load_teacher(str(text), None, 10, CLASSES, CPU)
    _one_line(e, str(text))

    detector = create_model("ssdlite_mobilenet_v3_small", width_mult=0.35, num_classes=3)
    det = str(save_weights(detector, tmp_path / "det.safetensors"))
    with pytest.raises(MobileNetError) as e:
        load_teacher(det, None, 10, CLASSES, CPU)
    _one_line(e, det, "detection", "not a classifier")

    five = _save(_model(5), tmp_path / "five.safetensors")
    with pytest.raises(MobileNetError) as e:
        load_teacher(five, None, 10, CLASSES, CPU)
    _one_line(e, five, "5 classes", "10")

    reordered = [CLASSES[1], CLASSES[0], *CLASSES[2:]]
    other = _save(_model(), tmp_path / "other.safetensors", reordered)
    with pytest.raises(MobileNetError) as e:
        load_teacher(other, None, 10, CLASSES, CPU)
    _one_line(e, other, "class 0", "'c1'", "'c0'")
    load_teacher(other, None, 10, None, CPU)  # data without names: only the count is held


# --------------------------------------------------------------------------- features


def test_feature_distilled_is_the_student_in_eval_and_projects_in_training(tmp_path):
    teacher_net = create_model("mobilenet_v2", width_mult=0.35, num_classes=10)
    path = _save(randomize_bn(teacher_net).eval(), tmp_path / "v2.safetensors", CLASSES)
    teacher = load_teacher(path, None, 10, CLASSES, CPU)
    channels = feature_channels(teacher)
    assert channels == teacher_net.feature_info[-1].channels
    student = _model()
    wrapped = FeatureDistilled(student, channels).eval()
    images = torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(wrapped(images), student(images))

    wrapped.train()
    logits, projected = wrapped(images)
    assert logits.shape == (2, 10) and projected.shape[1] == channels
    target, features = teacher.logits_and_features(images)
    assert torch.equal(features, teacher.features(images))
    loss = wrapped.feature_loss(projected, features) + kd_loss(logits, target, 2.0)
    loss.backward()
    assert wrapped.projection.weight.grad is not None
    assert wrapped.projection.weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())
