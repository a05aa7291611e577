"""Depthwise convs padded to the channel counts ONNX Runtime's fast int8 kernels take.

ONNX Runtime's fast int8 depthwise kernels (its "symmetric" convolutions) take channel
counts in multiples of 16 only, and fall back to a generic kernel 2-4x slower than float32
for others (V3-Large has 72, 120, 184 and 200). :func:`pad_depthwise` gives the float graph
zero channels up to the next multiple, zero weights in the convs around them, so the
outputs are the same.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

from .onnx_graph import GraphEditor, node_attribute, require_onnx

__all__ = ["pad_depthwise"]

_CHANNELWISE = {"Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Add", "Mul"}


class _Padding:
    """The rewrites that give one depthwise conv ``channels`` channels: the tensors that
    carry the extra (zero) channels, the convs that produce them, read them, or both."""

    def __init__(self, g: GraphEditor, channels: int) -> None:
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
            if int(node_attribute(node, "group", 1)) != 1 or node.input[1] not in self.g.init:
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
            if int(node_attribute(node, "group", 1)) != 1 or node.input[1] not in self.g.init:
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


def _depthwise_channels(g: GraphEditor, conv: Any) -> int | None:
    weight = g.arrays.get(conv.input[1]) if len(conv.input) > 1 else None
    group = int(node_attribute(conv, "group", 1))
    if weight is None or weight.ndim != 4 or group == 1:
        return None
    return group if weight.shape[0] == group and weight.shape[1] == 1 else None


def _pad_initializer(g: GraphEditor, node: Any, index: int, axis: int, size: int) -> None:
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
    onnx = require_onnx()
    padded = 0
    for node in list(model.graph.node):
        if node.name in keep:
            continue
        g = GraphEditor(model.graph)
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
