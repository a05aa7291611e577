"""Cost model: parameters, multiply-adds and activation memory, per layer and by type.

Conventions (all three papers): MAdds are the multiply-accumulates of convolutions and
fully connected layers only; BatchNorm, activations, pooling and residual additions are
free. MobileNetV4's attention (V4 Section 4.2) adds the two matrix products of
``softmax(Q K^T) V`` as layers of type ``attention``: ``heads * L * P * (key_dim +
value_dim)`` for ``L`` queries and ``P`` keys; its Q, K, V and output projections are
1x1 convs and count as such (the softmax, like any activation, is free). A convolution
producing ``N x Ho x Wo`` from ``M / groups`` input channels per group with a ``k x k``
kernel costs ``k*k*(M/groups)*N*Ho*Wo``; a linear layer ``in * out``. Parameters are all
parameters (BatchNorm included), so they agree with
``sum(p.numel() for p in model.parameters())``.

Everything is computed from shapes alone: the graph is traced and its shapes propagated on
PyTorch's ``meta`` device (tensors with a shape and no data), on a copy of the model whose
weights are meta tensors too, so any resolution and any width is measured at once and
without memory, real weights or not.

Activation memory is measured on the traced graph of a plain forward pass at batch 1:
every operation's output is a tensor that lives from the operation that makes it to the
last operation that reads it (views and identities share their input's storage). The
peak is the largest total of tensors alive at once; the largest single tensor is the
bound the V2 paper's memory-efficient inference (Section 5.1) improves on.

The input is square (``resolution=224``) or any ``(height, width)`` pair
(``resolution=(1024, 2048)``, Cityscapes). Dilated (atrous) convolutions need nothing
special: a conv's MAdds are counted at its output's size, so a stage kept at stride 1
costs 4x what it cost after a stride 2.

Golden figures at 224 (1000 classes): V1 4,231,976 params / 568.7M MAdds;
V2 3,504,872 / 300.8M; V3-Large 5,483,032 / 216.6M; V3-Small 2,542,856 / 56.5M.
MobileNetV4 at its own resolution: see docs/mobilenet_v4.md.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, TypeAlias

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import MobileNetError
from .layers import RmsNorm2d

# 2**20 pixels a side keeps the largest tensor of the widest model (about 2**12 channels
# x 2**38 pixels) well inside int64, which the meta device needs to propagate shapes.
MAX_RESOLUTION = 1 << 20

__all__ = [
    "LAYER_TYPES",
    "ActivationMemory",
    "Cost",
    "LayerCost",
    "activation_memory",
    "check_resolution",
    "cost",
    "layer_type",
]

LAYER_TYPES = ("conv1x1", "depthwise", "conv", "linear", "norm", "attention")
MIN_RESOLUTION = 32
Resolution: TypeAlias = int | tuple[int, int]  # square side, or (height, width)

# Operations whose output shares its input's storage in eager PyTorch.
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.Tensor.view, torch.Tensor.reshape}
_VIEW_METHODS = {"flatten", "view", "reshape", "contiguous"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class LayerCost:
    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    madds: int


@dataclass
class Cost:
    model: str
    width_mult: float
    resolution: Resolution  # as given: a square's side or (height, width)
    num_classes: int
    params: int
    madds: int
    largest_activation_bytes: int
    peak_activation_bytes: int
    by_type: dict[str, dict[str, int]]
    layers: list[LayerCost] = field(repr=False)

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [asdict(layer) for layer in self.layers] if per_layer else None
        if not per_layer:
            del out["layers"]
        return out


class ActivationMemory(NamedTuple):
    """Activation bytes of one forward pass at batch 1 (see the module docstring)."""

    largest: int  # the largest single tensor
    peak: int  # the most bytes alive at once in a plain (inference) forward pass
    total: int  # every tensor allocated: what training keeps for the backward pass


def check_resolution(resolution: int) -> int:
    # The upper bound keeps every shape within int64 (so the meta device can propagate
    # it); sizes that do not fit the machine are refused by mobilenet.limits instead.
    if (
        not isinstance(resolution, int)
        or isinstance(resolution, bool)
        or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION
    ):
        raise MobileNetError(
            f"resolution must be an integer >= {MIN_RESOLUTION} (the network's output "
            f"stride) and <= {MAX_RESOLUTION}, got {resolution!r}"
        )
    return resolution


def _input_size(resolution: Resolution, strict: bool) -> tuple[int, int]:
    """``(height, width)`` of a square side or a pair; ``strict``: each side checked by
    :func:`check_resolution` (a MobileNet's), else only a positive integer within bounds."""
    pair = (resolution, resolution) if not isinstance(resolution, tuple | list) else resolution
    if len(pair) != 2:
        raise MobileNetError(f"resolution must be a side or (height, width), got {resolution!r}")
    for side in pair:
        if strict:
            check_resolution(side)
        elif not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_RESOLUTION:
            raise MobileNetError(
                f"resolution sides must be integers >= 1 and <= {MAX_RESOLUTION}, "
                f"got {resolution!r}"
            )
    return int(pair[0]), int(pair[1])


def layer_type(module: nn.Module) -> str | None:
    """The cost category of a module: conv1x1, depthwise, conv (full kxk), linear, norm.
    (The sixth, ``attention``, is a function call in the traced graph: see :func:`cost`.)"""
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        return "conv1x1" if module.kernel_size == (1, 1) else "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "norm"
    return None


def _attention(node: fx.Node, wrapped: bool) -> LayerCost:
    """The cost of one ``scaled_dot_product_attention`` call (traced through the
    :class:`~mobilenet.layers.DotProductAttention` module that makes it)."""
    # q [B, heads, L, key_dim], k [B, 1 or heads, P, key_dim] -> Q K^T [B, heads, L, P]
    # (q.numel() * P MAdds), then A V -> [B, heads, L, value_dim] (output.numel() * P)
    q, k = (arg.meta["tensor_meta"].shape for arg in node.args[:2])
    output = node.meta["tensor_meta"].shape
    stack = list(node.meta.get("nn_module_stack", {}))
    name = stack[-1] if stack else node.name
    name = name.removeprefix("model.") if wrapped else name
    return LayerCost(name, "attention", tuple(output), 0, (q.numel() + output.numel()) * k[-2])


def _madds(module: nn.Module, output: torch.Size) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def cost(model: nn.Module | str, resolution: Resolution = 224) -> Cost:
    """Measure a model at ``resolution x resolution`` input, or at ``(height, width)``
    when ``resolution`` is a pair, batch 1.

    ``model`` is a module (e.g. from :func:`mobilenet.create_model`, on any device, the
    ``meta`` device included) or a registered name. A MobileNet needs sides >= 32, its
    output stride; any other module taking a 3-channel image is measured as it is.
    Nothing is computed on real tensors: shapes are propagated on the meta device.
    """
    from .models import MobileNet

    if isinstance(model, str):
        model = _meta_model(model)
    size = _input_size(resolution, strict=isinstance(model, MobileNet))
    config = getattr(model, "config", None)
    graph_module, wrapped = _propagate(model, size)
    modules = dict(graph_module.named_modules())
    layers: list[LayerCost] = []
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            layers.append(_attention(node, wrapped))
        if node.op != "call_module":
            continue
        module = modules[node.target]
        kind = layer_type(module)
        if kind is None:
            continue
        shape = node.meta["tensor_meta"].shape
        params = sum(p.numel() for p in module.parameters(recurse=False))
        name = node.target.removeprefix("model.") if wrapped else node.target
        layers.append(LayerCost(name, kind, tuple(shape), params, _madds(module, shape)))

    by_type = {kind: {"params": 0, "madds": 0} for kind in LAYER_TYPES}
    for layer in layers:
        by_type[layer.type]["params"] += layer.params
        by_type[layer.type]["madds"] += layer.madds
    # A norm the tracer steps into (MobileNetV5's RMS norm: a few tensor operations, no
    # module call in the graph) keeps its scales among the norms all the same.
    by_type["norm"]["params"] += sum(
        p.numel() for m in model.modules() if isinstance(m, RmsNorm2d) for p in m.parameters()
    )
    counted = sum(v["params"] for v in by_type.values())
    total_params = sum(p.numel() for p in model.parameters())
    if total_params != counted:
        by_type["other"] = {"params": total_params - counted, "madds": 0}

    largest, peak, _ = _activation_memory(graph_module)
    return Cost(
        model=config.name if config is not None else type(model).__name__,
        width_mult=config.width_mult if config is not None else 1.0,
        resolution=resolution,
        num_classes=config.num_classes if config is not None else -1,
        params=total_params,
        madds=sum(layer.madds for layer in layers),
        largest_activation_bytes=largest,
        peak_activation_bytes=peak,
        by_type=by_type,
        layers=layers,
    )


def activation_memory(model: nn.Module | str, resolution: Resolution = 224) -> ActivationMemory:
    """The activation bytes of one image through ``model`` (see :func:`cost`), including
    the total that a training step keeps for its backward pass."""
    if isinstance(model, str):
        model = _meta_model(model)
    return _activation_memory(_propagate(model, _input_size(resolution, strict=False))[0])


def _meta_model(name: str) -> nn.Module:
    from .models import create_model

    with torch.device("meta"):  # builds the weights as shapes only: no memory, no time
        return create_model(name)


def _on_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors.

    ``deepcopy`` takes an object from its memo when it finds it there, so seeding the memo
    with a meta tensor for every parameter and buffer copies the structure and never the
    data: a model of any size is copied at once.
    """
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(model, memo)


def _propagate(model: nn.Module, size: tuple[int, int]) -> tuple[fx.GraphModule, bool]:
    """The traced graph of a meta copy of ``model`` in eval mode, its shapes propagated
    from a ``1 x 3 x height x width`` input; and whether it is a detector's
    network wrapped in :class:`_RawOutputs` (its layer names then start with ``model.``)."""
    meta = _on_meta(model).eval()
    # A detector's forward takes a list of images and post-processes its outputs;
    # its network alone (tensor in, head outputs out) is forward_raw.
    wrapped = hasattr(meta, "forward_raw")
    graph_module = fx.symbolic_trace(_RawOutputs(meta) if wrapped else meta)
    first = next(itertools.chain(meta.parameters(), meta.buffers()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.empty(1, 3, *size, device="meta", dtype=dtype)
    with torch.no_grad():
        ShapeProp(graph_module).propagate(x)
    return graph_module, wrapped


class _RawOutputs(nn.Module):
    """A detector's network as a module: ``forward(x) = model.forward_raw(x)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model.forward_raw(x)


def _is_view(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _IDENTITY_MODULES)
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return False


def _activation_memory(graph_module: fx.GraphModule) -> ActivationMemory:
    """Largest single tensor, peak of live tensors and total, in bytes, from a
    shape-propagated graph."""
    modules = dict(graph_module.named_modules())
    nodes = list(graph_module.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    storage: dict[fx.Node, fx.Node] = {}  # node -> the node that allocated its storage
    size: dict[fx.Node, int] = {}
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        meta = node.meta.get("tensor_meta")
        if not isinstance(meta, fx.passes.shape_prop.TensorMetadata):
            continue
        if _is_view(node, modules) and node.args and node.args[0] in storage:
            storage[node] = storage[node.args[0]]
        else:
            storage[node] = node
            size[node] = meta.shape.numel() * meta.dtype.itemsize
            last_use[node] = position[node]
    # A storage lives until the last reader of it or of any view of it.
    for node, root in storage.items():
        for user in node.users:
            last_use[root] = max(last_use[root], position[user])
    largest = max(size.values())
    events = [0] * (len(nodes) + 1)
    for node, nbytes in size.items():
        events[position[node]] += nbytes
        events[last_use[node] + 1] -= nbytes
    peak = live = 0
    for delta in events:
        live += delta
        peak = max(peak, live)
    return ActivationMemory(largest, peak, sum(size.values()))
