"""Integer-only int8 ONNX graphs: h-sigmoid, h-swish and squeeze-excite kept in int8.

ONNX Runtime's QDQ quantization quantizes the ops it has integer kernels for (Conv, Gemm,
Add, Mul, GlobalAveragePool, Relu/Clip folded into the output range) and leaves every
other op in float between a DequantizeLinear and a QuantizeLinear. MobileNetV3 is made of
two such ops: ``HardSigmoid`` (h-swish is exported as ``x * HardSigmoid(x)``, V3 Section
5.2) and the squeeze-excite pool ``ReduceMean``. Left alone they keep about a fifth of the
int8 run time in float conversions (29 HardSigmoid and 8 ReduceMean in V3-Large).

:func:`integer_friendly` rewrites the float graph, before calibration, into ops with
integer kernels; the functions compute the same values:

- ``ReduceMean`` over H and W (keepdims) is ``GlobalAveragePool``.
- ``HardSigmoid(z) = clip(alpha z + beta, 0, 1)`` directly after a biased ``Conv`` used by
  nothing else (the squeeze-excite gate) is folded into it: the conv's weights times
  ``alpha``, its bias ``alpha b + beta``, then ``Clip(0, 1)``, which the quantizer folds
  into the output range. The gate costs nothing beyond its conv.
- Any other ``HardSigmoid`` (h-swish's) becomes ``Clip(x + beta / alpha, 0, 1 / alpha)``
  (an integer Add whose output range does the clipping) and a multiplication by
  ``alpha``, marked by name.

After quantization, :func:`fold_marked_scales` removes each marked multiplication by a
constant: multiplying a quantized tensor by ``alpha`` is the same integers read with
``alpha`` times the scale, so the DequantizeLinear after it reads the Add's integers with
the scale multiplied. h-swish is then one integer Add and one integer Mul.

:func:`fold_marked_shifts` then removes h-swish's integer Add (marked too): it moves the
grid of ``x`` so that ``-beta/alpha`` (-3) is integer 0 and ``beta/alpha`` a whole number
of steps, so that ``x + 3`` is the same integers read with another zero point, and its
clipping to ``[0, 6]`` is a ``Clip`` of the integers, about a third of the Add's time. The
values of ``x`` below -3 it drops are those h-swish maps to 0 whatever they are.

:func:`module_nodes` names the nodes of given modules (``features.0``: the stem), which
``quantize`` leaves in float32 where that measured faster (``export.quantize``); the two
rewrites above leave them as they are, so ONNX Runtime fuses them as float convs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from .onnx_graph import GraphEditor, node_attribute, require_onnx

__all__ = [
    "MARK",
    "SHIFT_MARK",
    "fold_marked_scales",
    "fold_marked_shifts",
    "integer_friendly",
    "module_nodes",
]

MARK = "mobilenet_qdq_scale_"  # name prefix of the Mul-by-constant nodes folded after PTQ
SHIFT_MARK = "mobilenet_qdq_shift_"  # name prefix of h-swish's shift Adds folded after PTQ
MAX_STEP_GROWTH = 2.0  # fold_marked_shifts moves a grid only where its step grows <= this


def _pool(g: GraphEditor, node: Any) -> list | None:
    """``ReduceMean(x, axes=[2, 3], keepdims=1)`` of a 4-D ``x`` as ``GlobalAveragePool``."""
    onnx = require_onnx()
    axes = sorted(int(a) % 4 for a in node_attribute(node, "axes", []))
    if axes != [2, 3] or not node_attribute(node, "keepdims", 1) or len(node.input) != 1:
        return None
    if g.ranks.get(node.input[0]) != 4:
        return None
    return [onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output))]


def _fold_into_conv(g: GraphEditor, node: Any, alpha: float, beta: float) -> list | None:
    """The gate folded into the biased conv before it, then ``Clip(0, 1)``."""
    onnx = require_onnx()
    conv = g.producer.get(node.input[0])
    if conv is None or conv.op_type != "Conv" or len(conv.input) != 3:
        return None
    if not g.only_user(node.input[0], node):
        return None
    if conv.input[1] not in g.init or conv.input[2] not in g.init:
        return None
    weight, bias = g.private(conv, 1), g.private(conv, 2)
    g.set_initializer(weight, g.arrays[weight] * alpha)
    g.set_initializer(bias, g.arrays[bias] * alpha + beta)
    low, high = g.constant(0.0, "clip_low"), g.constant(1.0, "clip_high")
    return [onnx.helper.make_node("Clip", [node.input[0], low, high], list(node.output))]


def _split(g: GraphEditor, node: Any, alpha: float, beta: float) -> list:
    """``clip(alpha x + beta, 0, 1)`` as ``Clip(x + beta/alpha, 0, 1/alpha) * alpha``."""
    onnx = require_onnx()
    name = node.name or node.output[0]
    shifted, clipped = f"{name}_shifted", f"{name}_clipped"
    shift = g.constant(beta / alpha, "hsig_shift")
    low, high = g.constant(0.0, "clip_low"), g.constant(1.0 / alpha, "clip_high")
    scale = g.constant(alpha, "hsig_alpha")
    g._count += 1
    return [
        onnx.helper.make_node(
            "Add",
            [node.input[0], shift],
            [shifted],
            name=f"{SHIFT_MARK}{g._count}",
            doc_string=f"{beta / alpha!r} {1.0 / alpha!r}",
        ),
        onnx.helper.make_node("Clip", [shifted, low, high], [clipped]),
        onnx.helper.make_node(
            "Mul",
            [clipped, scale],
            list(node.output),
            name=f"{MARK}{g._count}",
            doc_string=repr(alpha),
        ),
    ]


def _scope(parts: list[str]) -> list[str]:
    """The exporter's scope of a module path: each attribute by its name, a numbered child
    with the names down from the last named attribute (``features.4.se`` is
    ``features/features.4/se``)."""
    named = 0
    scope = []
    for i, part in enumerate(parts):
        if not part.isdigit():
            named = i
        scope.append(".".join(parts[named : i + 1]))
    return scope


def module_nodes(model: Any, modules: Sequence[str]) -> set[str]:
    """The names of the nodes that compute the ``modules`` (paths such as ``features.0``)
    of an exported model: those named or writing a tensor in one's scope
    (``/features/features.0/...``), and the h-sigmoid of an h-swish there, which the
    exporter writes unnamed. Unnamed nodes are named first (``node_<i>``), so that the
    quantizer can be told to leave them out."""
    taken = {node.name for node in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"node_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    scopes = ["/" + "/".join(_scope(module.split("."))) + "/" for module in modules]
    inside = lambda text: any(text.startswith(scope) for scope in scopes)  # noqa: E731
    names = {n.name for n in model.graph.node if inside(n.name) or any(map(inside, n.output))}
    users: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        for tensor in node.input:
            users[tensor].append(node.name)
    for node in model.graph.node:
        readers = [user for out in node.output for user in users[out]]
        if node.op_type == "HardSigmoid" and readers and all(r in names for r in readers):
            names.add(node.name)
    # The exporter shares equal constants (the zero biases of an untrained model): a float
    # conv that shares one with a quantized node would read it dequantized, and ONNX
    # Runtime would not give it its fast float kernels. Each gets a copy of its own.
    g = GraphEditor(model.graph)
    for node in model.graph.node:
        if node.name in names:
            for index, tensor in enumerate(node.input):
                if tensor in g.init:
                    g.private(node, index)
    return names


def integer_friendly(model: Any, keep: Collection[str] = ()) -> Any:
    """Rewrite a float ONNX model (shapes inferred) in place so that QDQ quantization
    keeps MobileNetV3's h-sigmoid, h-swish and squeeze-excite in integer ops; the nodes
    named in ``keep`` (those left in float) stay as they are."""
    g = GraphEditor(model.graph)
    rewritten = []
    for node in model.graph.node:
        replacement = None
        if node.name in keep:
            pass
        elif node.op_type == "ReduceMean":
            replacement = _pool(g, node)
        elif node.op_type == "HardSigmoid":
            alpha = float(node_attribute(node, "alpha", 0.2))
            beta = float(node_attribute(node, "beta", 0.5))
            if alpha > 0:
                replacement = _fold_into_conv(g, node, alpha, beta) or _split(g, node, alpha, beta)
        rewritten.extend(replacement if replacement is not None else [node])
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    return model


def fold_marked_scales(model: Any) -> int:
    """Remove every marked ``DequantizeLinear -> Mul(alpha) -> QuantizeLinear`` of a QDQ
    model, reading the integers before it with ``alpha`` times their scale; returns how
    many were folded (a marked Mul left in float by the quantizer stays as it is)."""
    g = GraphEditor(model.graph)
    removed: set[int] = set()
    folded = 0
    for mul in list(model.graph.node):
        if mul.op_type != "Mul" or not mul.name.startswith(MARK):
            continue
        plan = _fold_plan(g, mul)
        if plan is None:
            continue
        source, alpha, quantize, readers = plan
        scale = g.constant(g.arrays[source.input[1]] * alpha, "folded_scale")
        for reader in readers:
            reader.input[0] = source.input[0]
            reader.input[1] = scale
            if len(source.input) > 2:
                if len(reader.input) > 2:
                    reader.input[2] = source.input[2]
                else:
                    reader.input.append(source.input[2])
        constant = g.producer.get(mul.input[1])
        removed.update({id(mul), id(quantize)})
        for dq in (source, constant):
            if dq is not None and len(g.consumers[dq.output[0]]) == 1:
                removed.add(id(dq))
        folded += 1
    _rebuild(model, removed)
    return folded


def _fold_plan(g: GraphEditor, mul: Any) -> tuple | None:
    """(the DequantizeLinear before ``mul``, alpha, the QuantizeLinear after it, the
    DequantizeLinear nodes that read it), or None where the pattern is not all there."""
    source = g.producer.get(mul.input[0])
    constant = g.producer.get(mul.input[1])
    if source is None or source.op_type != "DequantizeLinear":
        return None
    if mul.doc_string:  # the exact constant, as integer_friendly wrote it
        alpha = float(mul.doc_string)
    elif constant is not None and constant.op_type == "DequantizeLinear":
        values = g.arrays.get(constant.input[0])
        scale = g.arrays.get(constant.input[1])
        zero = g.arrays.get(constant.input[2]) if len(constant.input) > 2 else 0
        if values is None or scale is None:
            return None
        alpha = float(((values.astype(np.float64) - np.float64(zero)) * scale).reshape(-1)[0])
    elif mul.input[1] in g.arrays:
        alpha = float(g.arrays[mul.input[1]].reshape(-1)[0])
    else:
        return None
    if not _scalar(g, source.input[1]):
        return None
    users = g.consumers.get(mul.output[0], [])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear" or mul.output[0] in g.outputs:
        return None
    quantize = users[0]
    readers = g.consumers.get(quantize.output[0], [])
    if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
        return None
    if quantize.output[0] in g.outputs:
        return None
    return source, alpha, quantize, readers


def _rebuild(model: Any, removed: set[int], before: dict[int, Any] | None = None) -> None:
    """Keep the nodes not ``removed`` (ids), ``before[id]`` in front of node ``id``, and
    the initializers still read."""
    nodes = []
    for node in model.graph.node:
        if before and id(node) in before:
            nodes.append(before[id(node)])
        if id(node) not in removed:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model.graph)


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fold_marked_shifts(model: Any) -> int:
    """Remove every marked h-sigmoid shift ``Clip(x + c, 0, H)`` of a QDQ model (an
    integer Add whose output range clips) where ``x``'s integers feed only it and
    h-swish's Mul: ``x``'s grid is moved so that ``-c`` is integer 0 and ``c`` a whole
    number ``k`` of steps, the Add's readers read ``Clip(q, 0, k H / c)`` of the same
    integers, and the Add goes; returns how many were folded. A grid that would need a
    step more than ``MAX_STEP_GROWTH`` times coarser (``x`` calibrated to a range much
    narrower than ``[-c, c]``) is left as it is, as is any pattern not all there."""
    g = GraphEditor(model.graph)
    removed: set[int] = set()
    clips: dict[int, Any] = {}  # the Clip that takes the place of the Add of that id
    folded = 0
    for add in model.graph.node:
        if add.op_type != "Add" or not add.name.startswith(SHIFT_MARK):
            continue
        plan = _shift_plan(g, add)
        if plan is None:
            continue
        quantize_x, readers, shift, high = plan
        scale, zero = g.arrays[quantize_x.input[1]], g.arrays[quantize_x.input[2]]
        top = (255 - int(zero)) * float(scale)  # the largest x the grid holds
        steps = int(np.floor(255 * shift / (shift + top)))  # c in steps of the new grid
        if steps < 1 or shift / steps > MAX_STEP_GROWTH * float(scale):
            continue
        step = shift / steps
        new_scale = g.constant(step, "shift_scale")
        new_zero = g.constant(steps, "shift_zero_point", zero.dtype)
        for node in [quantize_x, *g.consumers[quantize_x.output[0]]]:
            node.input[1], node.input[2] = new_scale, new_zero
        integers = quantize_x.output[0]
        ceiling = round(steps * high / shift)  # x + c = H
        if ceiling < 255:
            bounds = [g.constant(b, "shift_clip", zero.dtype) for b in (0, ceiling)]
            clipped = f"{add.output[0]}_integer_clip"
            name = add.name.replace(SHIFT_MARK, "hsigmoid_clip_")
            clip = require_onnx().helper.make_node(
                "Clip", [integers, *bounds], [clipped], name=name
            )
            clips[id(add)] = clip
            integers = clipped
        quantize_a = g.consumers[add.output[0]][0]
        origin = float(g.arrays[quantize_a.input[1]])
        at_zero = g.constant(0, "shift_read_zero_point", zero.dtype)
        for reader in readers:
            factor = float(g.arrays[reader.input[1]]) / origin  # the folded alpha
            reader.input[0] = integers
            reader.input[1] = g.constant(step * factor, "shift_read_scale")
            reader.input[2] = at_zero
        removed.update({id(add), id(quantize_a)})
        constant = g.producer.get(add.input[1])
        if constant is not None and len(g.consumers[constant.output[0]]) == 1:
            removed.add(id(constant))
        folded += 1
    _rebuild(model, removed, clips)
    return folded


def _scalar(g: GraphEditor, name: str) -> bool:
    return name in g.arrays and g.arrays[name].size == 1


def _at_zero(g: GraphEditor, node: Any) -> bool:
    """Whether a (De)QuantizeLinear's scale is one number and its zero point 0."""
    if len(node.input) < 3 or not all(_scalar(g, name) for name in node.input[1:3]):
        return False
    return int(g.arrays[node.input[2]]) == 0


def _shift_plan(g: GraphEditor, add: Any) -> tuple | None:
    """(the QuantizeLinear of ``x``, the DequantizeLinear nodes that read the shifted and
    clipped integers, c, H) of a marked ``Clip(x + c, 0, H)``, or None where the pattern
    is not all there: ``x`` quantized per tensor and read only by the Add and by
    Muls that also read the shifted integers."""
    try:
        shift, high = (float(v) for v in add.doc_string.split())
    except ValueError:
        return None
    source = g.producer.get(add.input[0])
    if source is None or source.op_type != "DequantizeLinear":
        return None
    quantize_x = g.producer.get(source.input[0])
    if quantize_x is None or quantize_x.op_type != "QuantizeLinear" or len(quantize_x.input) < 3:
        return None
    if not all(_scalar(g, name) for name in quantize_x.input[1:3]):
        return None
    if g.arrays[quantize_x.input[2]].dtype != np.uint8 or quantize_x.output[0] in g.outputs:
        return None
    users = g.consumers.get(add.output[0], [])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear" or add.output[0] in g.outputs:
        return None
    quantize_a = users[0]  # its range starts at 0: the Clip folded into it
    if not _at_zero(g, quantize_a) or quantize_a.output[0] in g.outputs:
        return None
    readers = g.consumers.get(quantize_a.output[0], [])
    if not readers or any(r.op_type != "DequantizeLinear" or not _at_zero(g, r) for r in readers):
        return None
    shifted = {r.output[0] for r in readers}
    for dq in g.consumers[quantize_x.output[0]]:
        if dq.op_type != "DequantizeLinear" or list(dq.input[1:3]) != list(quantize_x.input[1:3]):
            return None
        for user in g.consumers.get(dq.output[0], []):
            if user is add:
                continue
            if user.op_type != "Mul" or not shifted.intersection(user.input):
                return None
    return quantize_x, readers, shift, high
