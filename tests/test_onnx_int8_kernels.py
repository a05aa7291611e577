"""An int8 ONNX file runs as it says on every CPU: where ONNX Runtime's int8 kernels do
not compute the file's QDQ graph (uint8 x int8 saturation on x86 without VNNI), eval and
predict run the QDQ graph in float32 and say so."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mobilenet.classification.predict import load_trained
from mobilenet.export.onnx import onnx_session
from mobilenet.export.onnx_int8 import kernel_agreement, probe_images, runnable_int8_session

pytest.importorskip("onnxruntime")

INT8 = Path(__file__).parent / "fixtures" / "legacy" / "classifier_int8.onnx"
SIZE = (32, 32)


class Scaled:
    """A session whose logits are another's times ``factor``: a kernel that reads an
    activation at the wrong scale."""

    def __init__(self, session, factor: float) -> None:
        self.session, self.factor = session, factor

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feeds):
        return [np.asarray(self.session.run(outputs, feeds)[0]) * self.factor]


def test_the_qdq_graph_in_float_agrees_with_itself():
    qdq = onnx_session(INT8, qdq_in_float=True)
    agreement = kernel_agreement(qdq, qdq, probe_images(SIZE))
    assert agreement.error == 0 and agreement.refusal("ONNX Runtime") is None


def test_kernels_that_compute_something_else_are_replaced_with_one_line():
    qdq = onnx_session(INT8, qdq_in_float=True)
    wrong = Scaled(qdq, 0.5)
    assert kernel_agreement(wrong, qdq, probe_images(SIZE)).refusal("ONNX Runtime")
    told: list[str] = []
    chosen = runnable_int8_session(INT8, wrong, SIZE, warn=told.append)
    assert chosen is not wrong and len(told) == 1
    assert "running its QDQ graph in float32" in told[0] and str(INT8) in told[0]
    x = probe_images(SIZE)
    name = qdq.get_inputs()[0].name
    assert np.array_equal(
        chosen.run(None, {name: x.numpy()})[0], qdq.run(None, {name: x.numpy()})[0]
    )


def test_what_eval_runs_computes_the_file_on_this_cpu():
    """On any CPU: the loaded model agrees with the file's QDQ graph within the rule,
    whether it kept ONNX Runtime's int8 kernels (they agree here) or fell back."""
    trained = load_trained(str(INT8))
    qdq = onnx_session(INT8, qdq_in_float=True)
    chosen = trained.model.session
    assert kernel_agreement(chosen, qdq, probe_images(SIZE)).refusal("ONNX Runtime") is None
    with torch.no_grad():
        logits = trained.model(probe_images(SIZE))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
