"""An ONNX graph being rewritten in place, as the int8 graph rewrites do.

:class:`GraphEditor` keeps the maps a rewrite looks things up in (who produces a tensor,
who reads it, the initializers as arrays) and makes the edits that keep them current;
:func:`node_attribute` reads a node's attribute. Shared by the integer-only rewrites
(:mod:`mobilenet.export.qdq`) and the depthwise padding (:mod:`mobilenet.export.qdq_pad`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ..extras import require

__all__ = ["GraphEditor", "node_attribute", "require_onnx"]


def require_onnx() -> Any:
    """The ``onnx`` module, or the error that names the extra that installs it."""
    return require("onnx", "deploy", "int8 ONNX quantization")


class GraphEditor:
    """An ONNX graph being rewritten: its producer, consumer and initializer maps, and the
    edits (new constants, changed initializers, private copies) that keep them current.
    The rewrites of :mod:`mobilenet.export.qdq` and :mod:`mobilenet.export.qdq_pad` share it."""

    def __init__(self, graph: Any) -> None:
        onnx = require_onnx()
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

    def constant(self, value: np.ndarray | float, hint: str, dtype: Any = np.float32) -> str:
        onnx = require_onnx()
        self._count += 1
        name = f"{hint}_{self._count}"
        while name in self.init:
            self._count += 1
            name = f"{hint}_{self._count}"
        array = np.asarray(value, dtype=dtype)
        tensor = onnx.numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.init[name], self.arrays[name] = self.graph.initializer[-1], array
        return name

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        onnx = require_onnx()
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


def node_attribute(node: Any, name: str, default: Any) -> Any:
    """The value of ``node``'s attribute ``name`` (``default`` where it has none)."""
    onnx = require_onnx()
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
