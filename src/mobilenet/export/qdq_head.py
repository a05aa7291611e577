"""The classifier head of an int8 graph as 1x1 convolutions on the pooled [N, C, 1, 1] map.

The exported classifier is ``GlobalAveragePool -> Flatten -> Gemm (-> activation ->
Gemm)``. Quantized, ONNX Runtime runs those layers as ``QGemm``, and the pool before them
in NCHW behind a ``Transpose`` from the NHWC layout its int8 convolutions work in. A
``Gemm`` of a flattened [N, C, 1, 1] map is the 1x1 convolution with the same weights, and
as a convolution the head runs on the same int8 kernels as the network's other pointwise
convolutions, and the pool in NHWC: 1-4% less time for every V2, V3 and V4 (V1 the same;
batch 1 at 224, one thread, side by side). :func:`head_as_convs` rewrites the float graph
so before it is quantized; the outputs are the same tensors, flattened at the end.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from .qdq import _attribute, _drop_unused_initializers, _Graph, _onnx

__all__ = ["head_as_convs"]

# Ops that work element by element, the same on [N, C] as on [N, C, 1, 1]; a second input
# must be a tensor of the head too or a one-number constant.
_ELEMENTWISE = {"Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Add", "Mul", "Identity"}


def _as_conv(g: _Graph, gemm: Any) -> list | None:
    """The weight (and bias) of a ``Gemm`` as a 1x1 conv's, or None where it is not one."""
    if len(gemm.input) < 2 or gemm.input[1] not in g.init or _attribute(gemm, "transA", 0):
        return None
    if float(_attribute(gemm, "alpha", 1.0)) != 1.0 or float(_attribute(gemm, "beta", 1.0)) != 1.0:
        return None
    weight = g.arrays[gemm.input[1]]
    weight = weight if _attribute(gemm, "transB", 0) else weight.T
    bias = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else None
    if weight.ndim != 2:
        return None
    if bias is not None and (bias not in g.init or g.arrays[bias].shape != weight.shape[:1]):
        return None  # a conv's bias is one number per output channel
    return [g.constant(weight[:, :, None, None], gemm.input[1]), *([bias] if bias else [])]


def _of_head(g: _Graph, node: Any, four_d: dict[str, str]) -> bool:
    """Whether an element-wise ``node`` reads a tensor of the head, and otherwise only
    tensors of the head or one-number constants."""
    inputs = [i for i in node.input if i]
    return any(i in four_d for i in inputs) and all(
        i in four_d or (i in g.init and g.arrays[i].size == 1) for i in inputs
    )


def _pooled(g: _Graph, flatten: Any) -> bool:
    pool = g.producer.get(flatten.input[0])
    return (
        pool is not None
        and pool.op_type == "GlobalAveragePool"
        and int(_attribute(flatten, "axis", 1)) == 1
        and g.ranks.get(flatten.input[0]) == 4
    )


def head_as_convs(model: Any, keep: Collection[str] = ()) -> int:
    """Rewrite, in place, each ``Gemm`` that reads a flattened global pool (through
    element-wise ops) as a 1x1 ``Conv`` of the pooled map; the tensors the rest of the
    graph reads are flattened from it, so the outputs are the same. Returns how many
    Gemms were rewritten; those named in ``keep`` (left in float) stay as they are."""
    onnx = _onnx()
    g = _Graph(model.graph)
    helper = onnx.helper
    four_d: dict[str, str] = {}  # 2-D tensor of the head -> its [N, C, 1, 1] twin
    converted: dict[int, Any] = {}  # id of a replaced node -> its replacement
    for flatten in [n for n in model.graph.node if n.op_type == "Flatten"]:
        if _pooled(g, flatten):
            four_d[flatten.output[0]] = flatten.input[0]
            converted[id(flatten)] = None
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if id(node) in converted or node.name in keep or not node.input:
                continue
            if node.op_type == "Gemm" and node.input[0] in four_d:
                inputs = _as_conv(g, node)
                if inputs is None:
                    continue
                twin = f"{node.output[0]}_nchw"
                conv = helper.make_node(
                    "Conv", [four_d[node.input[0]], *inputs], [twin], name=node.name
                )
                conv.attribute.extend([helper.make_attribute("kernel_shape", [1, 1])])
                converted[id(node)], four_d[node.output[0]] = conv, twin
                changed = True
            elif node.op_type in _ELEMENTWISE and _of_head(g, node, four_d):
                twin = f"{node.output[0]}_nchw"
                copy = helper.make_node(
                    node.op_type, [four_d.get(i, i) for i in node.input], [twin], name=node.name
                )
                copy.attribute.extend(node.attribute)
                converted[id(node)], four_d[node.output[0]] = copy, twin
                changed = True
    gemms = sum(1 for n in converted.values() if n is not None and n.op_type == "Conv")
    if not gemms:
        return 0
    nodes = []
    for node in model.graph.node:
        replacement = converted.get(id(node), node)
        if replacement is not None:
            nodes.append(replacement)
        for out in node.output if id(node) in converted else []:
            readers = [r for r in g.consumers.get(out, []) if id(r) not in converted]
            if readers or out in g.outputs:  # read in 2-D: flattened from its twin
                flatten = helper.make_node("Flatten", [four_d[out]], [out], f"{node.name}/flatten")
                flatten.attribute.extend([helper.make_attribute("axis", 1)])
                nodes.append(flatten)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model.graph)  # the Gemms' 2-D weights
    del model.graph.value_info[:]
    model.graph.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
    return gemms
