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

:func:`pad_depthwise` serves the depthwise convs: ONNX Runtime's fast int8 depthwise
kernels (its "symmetric" convolutions) take channel counts in multiples of 16 only, and
fall back to a generic kernel 2-4x slower than float32 for others (V3-Large has 72, 120,
184 and 200). The float graph gets zero channels up to the next multiple, zero weights
in the convs around them, so the outputs are the same.

:func:`module_nodes` names the nodes of given modules (``features.0``: the stem), which
``quantize`` leaves in float32 where that measured faster (``export.quantize``); the two
rewrites above leave them as they are, so ONNX Runtime fuses them as float convs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from ..extras import require

__all__ = ["MARK", "fold_marked_scales", "integer_friendly", "module_nodes", "pad_depthwise"]

MARK = "mobilenet_qdq_scale_"  # name prefix of the Mul-by-constant nodes folded after PTQ


def _onnx():
    return require("onnx", "deploy", "int8 ONNX quantization")


class _Graph:
    """Producer, consumer and initializer maps of an ONNX graph being rewritten."""

    def __init__(self, graph: Any) -> None:
        onnx = _onnx()
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.init = {t.name: t for t in graph.initializer}
        self.arrays = {name: onnx.numpy_helper.to_array(t) for name, t in self.init.items()}
        self.outputs = {o.name for o in graph.output}
        self.ranks = {
            v.name: len(v.type.tensor_type.shape.dim)
            for v in [*graph.value_info, *graph.input, *graph.output]
            if v.type.tensor_type.HasField("shape")
        }
        self._count = 0

    def constant(self, value: np.ndarray | float, hint: str) -> str:
        onnx = _onnx()
        self._count += 1
        name = f"{hint}_{self._count}"
        while name in self.init:
            self._count += 1
            name = f"{hint}_{self._count}"
        array = np.asarray(value, dtype=np.float32)
        tensor = onnx.numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.init[name], self.arrays[name] = self.graph.initializer[-1], array
        return name

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        onnx = _onnx()
        self.init[name].CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), name))

    def private(self, node: Any, index: int) -> str:
        """The name of ``node``'s initializer input ``index``, copied first where other
        nodes use it too (exporters share equal constants, e.g. zero biases)."""
        name = node.input[index]
        users = self.consumers[name]
        if len(users) > 1:
            copy = self.constant(self.arrays[name], name)
            users.remove(node)
            self.consumers[copy] = [node]
            node.input[index] = name = copy
        return name

    def only_user(self, tensor: str, node: Any) -> bool:
        users = self.consumers.get(tensor, [])
        return tensor not in self.outputs and len(users) == 1 and users[0] is node


def _attribute(node: Any, name: str, default: Any) -> Any:
    onnx = _onnx()
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _pool(g: _Graph, node: Any) -> list | None:
    """``ReduceMean(x, axes=[2, 3], keepdims=1)`` of a 4-D ``x`` as ``GlobalAveragePool``."""
    onnx = _onnx()
    axes = sorted(int(a) % 4 for a in _attribute(node, "axes", []))
    if axes != [2, 3] or not _attribute(node, "keepdims", 1) or len(node.input) != 1:
        return None
    if g.ranks.get(node.input[0]) != 4:
        return None
    return [onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output))]


def _fold_into_conv(g: _Graph, node: Any, alpha: float, beta: float) -> list | None:
    """The gate folded into the biased conv before it, then ``Clip(0, 1)``."""
    onnx = _onnx()
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


def _split(g: _Graph, node: Any, alpha: float, beta: float) -> list:
    """``clip(alpha x + beta, 0, 1)`` as ``Clip(x + beta/alpha, 0, 1/alpha) * alpha``."""
    onnx = _onnx()
    name = node.name or node.output[0]
    shifted, clipped = f"{name}_shifted", f"{name}_clipped"
    shift = g.constant(beta / alpha, "hsig_shift")
    low, high = g.constant(0.0, "clip_low"), g.constant(1.0 / alpha, "clip_high")
    scale = g.constant(alpha, "hsig_alpha")
    g._count += 1
    return [
        onnx.helper.make_node("Add", [node.input[0], shift], [shifted]),
        onnx.helper.make_node("Clip", [shifted, low, high], [clipped]),
        onnx.helper.make_node(
            "Mul",
            [clipped, scale],
            list(node.output),
            name=f"{MARK}{g._count}",
            doc_string=repr(alpha),
        ),
    ]


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
    scopes = []
    for module in modules:
        parts = module.split(".")
        scopes.append("/" + "/".join(".".join(parts[: i + 1]) for i in range(len(parts))) + "/")
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
    g = _Graph(model.graph)
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
    g = _Graph(model.graph)
    rewritten = []
    for node in model.graph.node:
        replacement = None
        if node.name in keep:
            pass
        elif node.op_type == "ReduceMean":
            replacement = _pool(g, node)
        elif node.op_type == "HardSigmoid":
            alpha = float(_attribute(node, "alpha", 0.2))
            beta = float(_attribute(node, "beta", 0.5))
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
    g = _Graph(model.graph)
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
    kept = [node for node in model.graph.node if id(node) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused_initializers(model.graph)
    return folded


def _fold_plan(g: _Graph, mul: Any) -> tuple | None:
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
    if source.input[1] not in g.arrays or g.arrays[source.input[1]].size != 1:
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


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


_CHANNELWISE = {"Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Add", "Mul"}


class _Padding:
    """The rewrites that give one depthwise conv ``channels`` channels: the tensors that
    carry the extra (zero) channels, the convs that produce them, read them, or both."""

    def __init__(self, g: _Graph, channels: int) -> None:
        self.g, self.channels = g, channels
        self.tensors: set[str] = set()
        self.produce: dict[int, Any] = {}  # group-1 convs whose outputs grow
        self.read: dict[int, Any] = {}  # group-1 convs whose inputs grow
        self.depthwise: dict[int, Any] = {}  # depthwise convs that grow

    def tensor(self, name: str) -> bool:
        """Mark ``name`` as padded, with what produces and reads it; False where the graph
        does not allow it (a graph input or output, a constant, an op that mixes channels
        other than a conv)."""
        if name in self.tensors:
            return True
        g = self.g
        if name in g.init or name in g.outputs or name not in g.producer:
            return False
        self.tensors.add(name)
        return self._producer(g.producer[name]) and all(
            self._consumer(node, name) for node in g.consumers.get(name, [])
        )

    def _constant(self, name: str) -> bool:
        return name in self.g.init and self.g.arrays[name].size == 1

    def _producer(self, node: Any) -> bool:
        if node.op_type == "Conv":
            if _depthwise_channels(self.g, node) is not None:
                self.depthwise[id(node)] = node
                return self.tensor(node.input[0])
            if int(_attribute(node, "group", 1)) != 1 or node.input[1] not in self.g.init:
                return False
            self.produce[id(node)] = node
            return True
        if node.op_type in ("GlobalAveragePool", "ReduceMean"):
            return node.op_type == "GlobalAveragePool" and self.tensor(node.input[0])
        if node.op_type in _CHANNELWISE:
            return all(self._constant(i) or self.tensor(i) for i in node.input if i)
        return False

    def _consumer(self, node: Any, name: str) -> bool:
        if node.op_type == "Conv":
            if _depthwise_channels(self.g, node) is not None:
                self.depthwise[id(node)] = node
                return self.tensor(node.output[0])
            if int(_attribute(node, "group", 1)) != 1 or node.input[1] not in self.g.init:
                return False
            if node.input[0] == name:
                self.read[id(node)] = node
            return node.input[0] == name
        if node.op_type == "GlobalAveragePool" or node.op_type in _CHANNELWISE:
            return self.tensor(node.output[0]) and self._producer(node)
        return False

    def apply(self) -> None:
        g, channels = self.g, self.channels
        for conv in [*self.produce.values(), *self.depthwise.values()]:
            for index in range(1, len(conv.input)):  # weight and bias
                _pad_initializer(g, conv, index, 0, channels)
        for conv in self.read.values():
            _pad_initializer(g, conv, 1, 1, channels)
        for conv in self.depthwise.values():
            for attr in conv.attribute:
                if attr.name == "group":
                    attr.i = channels


def _depthwise_channels(g: _Graph, conv: Any) -> int | None:
    weight = g.arrays.get(conv.input[1]) if len(conv.input) > 1 else None
    group = int(_attribute(conv, "group", 1))
    if weight is None or weight.ndim != 4 or group == 1:
        return None
    return group if weight.shape[0] == group and weight.shape[1] == 1 else None


def _pad_initializer(g: _Graph, node: Any, index: int, axis: int, size: int) -> None:
    """Zeros appended to ``node``'s initializer input ``index`` along ``axis``."""
    name = g.private(node, index)
    array = g.arrays[name]
    if array.shape[axis] >= size:
        return
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    g.arrays[name] = np.pad(array, widths)
    g.set_initializer(name, g.arrays[name])


def pad_depthwise(model: Any, multiple: int = 16, keep: Collection[str] = ()) -> int:
    """Give every depthwise conv a multiple of ``multiple`` channels, with zero weights in
    the convs before and after it, so the extra channels are zero and the outputs the
    same; returns how many were padded. ONNX Runtime's fast int8 depthwise kernels take
    channel counts in multiples of 16 only (V3-Large has 72, 120, 184 and 200). A conv
    whose neighbours are not convs and channel-wise ops is left as it is, as are those
    named in ``keep`` (left in float)."""
    onnx = _onnx()
    padded = 0
    for node in list(model.graph.node):
        if node.name in keep:
            continue
        g = _Graph(model.graph)
        channels = _depthwise_channels(g, node) if node.op_type == "Conv" else None
        if channels is None or channels % multiple == 0:
            continue
        plan = _Padding(g, -(-channels // multiple) * multiple)
        plan.depthwise[id(node)] = node
        if plan.tensor(node.input[0]) and plan.tensor(node.output[0]):
            plan.apply()
            padded += 1
    if padded:
        del model.graph.value_info[:]
        inferred = onnx.shape_inference.infer_shapes(model)
        model.graph.value_info.extend(inferred.graph.value_info)
    return padded
