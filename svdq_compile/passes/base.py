"""What every svdquant graph pass shares: the call convention, a uuid, and linear-node helpers.

A pass rewrites a Dynamo-level FX graph (torch functions such as ``F.linear``, before AOT autograd)
in place and returns how many patterns it replaced. Passes do not quantize anything themselves:
they ask a ``WeightProvider`` (implemented by the backend and by the Inductor pass) for the graph
nodes that carry a weight's quantized tensors, so the same pass runs whether those tensors arrive as
extra graph inputs (the backend) or as frozen constants (Inductor's pre-grad hook).
"""

from __future__ import annotations

import hashlib
import inspect
import operator
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import fx
from torch.nn import functional as F

from .. import ops  # noqa: F401  (registers torch.ops.svdq.w4a4_linear)

# The op every pass emits; its argument order is (x, weight_q, weight_scales, smooth_inv,
# lora_down, lora_up, bias, group_size), then the keywords x_tail, gelu_start and gelu_end that the epilogue
# and input passes set; see svdq_compile/ops.py.
W4A4_OP = torch.ops.svdq.w4a4_linear.default

_LINEAR_TARGETS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


@dataclass
class QuantizedNodes:
    """The graph nodes of one quantized weight, in the op's argument order."""

    weight_q: fx.Node
    weight_scales: fx.Node
    smooth_inv: fx.Node
    lora_down: fx.Node
    lora_up: fx.Node
    group_size: int


class WeightProvider(Protocol):
    """Decides, per weight node, whether a linear is quantized, and supplies its quantized tensors."""

    def quantized_nodes(self, graph: fx.Graph, weight: fx.Node) -> QuantizedNodes | None:
        """Nodes carrying the quantized form of ``weight``, or None to keep the linear in 16-bit."""
        ...

    def quantizes(self, weight: fx.Node) -> bool:
        """Whether ``quantized_nodes`` would quantize ``weight`` (skip globs, shapes); no side effects."""
        ...

    def joint_quantized_nodes(self, graph: fx.Graph, weights: list[fx.Node]) -> QuantizedNodes | None:
        """Nodes of one quantized layer whose output rows are ``weights``' rows in order (weights of
        linears reading the same input), or None when they cannot share one op."""
        ...


class SVDQPass:
    """Base class of svdquant FX passes: ``pass_(graph) -> number of rewrites``.

    Subclasses implement ``apply``; ``uuid()`` hashes the subclass source so Inductor's FX-graph
    cache key changes whenever a pass changes (the contract of Inductor's ``CustomGraphPass``).

    Example:
        >>> class Nothing(SVDQPass):
        ...     def apply(self, graph):
        ...         return 0
        >>> Nothing(provider=None)(torch.fx.Graph())
        0
    """

    def __init__(self, provider: WeightProvider) -> None:
        self.provider = provider

    def __call__(self, graph: fx.Graph) -> int:
        count = self.apply(graph)
        if count:
            graph.eliminate_dead_code()
            graph.lint()
        return count

    def apply(self, graph: fx.Graph) -> int:
        raise NotImplementedError

    @classmethod
    def uuid(cls) -> str:
        """Hash of the source of this pass's file (its helpers included) and of this one (changes
        whenever the rewrite changes)."""
        source = inspect.getsource(inspect.getmodule(cls)) + inspect.getsource(inspect.getmodule(SVDQPass))
        return hashlib.sha256(source.encode()).hexdigest()


def linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """``(x, weight, bias)`` of a ``linear`` call node whose weight is a graph node, else None.

    Example:
        >>> g = torch.fx.Graph(); x = g.placeholder("x"); w = g.placeholder("w")
        >>> linear_parts(g.call_function(F.linear, (x, w))) == (x, w, None)
        True
    """
    if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x = args[0] if node.args else node.kwargs.get("input")
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node):
        return None
    if bias is not None and not isinstance(bias, fx.Node):
        return None
    return x, weight, bias


def is_add(node: fx.Node) -> bool:
    """True for a two-operand addition as Dynamo traces ``a + b`` or ``torch.add(a, b)``."""
    return node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd) and len(node.args) == 2 and not node.kwargs


def is_mul(node: fx.Node) -> bool:
    """True for a two-operand multiplication (``a * b`` / ``torch.mul``)."""
    return node.op == "call_function" and node.target in (operator.mul, torch.mul, operator.imul) and len(node.args) == 2 and not node.kwargs


def emit_w4a4(graph: fx.Graph, x: fx.Node, quant: QuantizedNodes, bias: fx.Node | None, lora_down: fx.Node | None = None, lora_up: fx.Node | None = None) -> fx.Node:
    """Insert ``svdq.w4a4_linear`` at the graph's current insertion point and return its node.

    ``lora_down`` / ``lora_up`` default to the quantized layer's own low-rank factors; the LoRA pass
    passes concatenations with adapter factors instead.
    """
    args = (x, quant.weight_q, quant.weight_scales, quant.smooth_inv, quant.lora_down if lora_down is None else lora_down, quant.lora_up if lora_up is None else lora_up, bias, quant.group_size)
    return graph.call_function(W4A4_OP, args)


def traced_value(node: object) -> object:
    """The value Dynamo (``example_value``) or AOT tracing (``val``) recorded for a graph node, else
    None (hand-built graphs, non-node arguments).

    Example:
        >>> g = fx.Graph(); x = g.placeholder("x"); x.meta["val"] = torch.zeros(2)
        >>> traced_value(x).shape, traced_value(3)
        (torch.Size([2]), None)
    """
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def cast_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype of a ``y.to(dtype)`` call node (dtype alone, positional or keyword), else None.

    Example:
        >>> g = fx.Graph(); y = g.placeholder("y")
        >>> cast_dtype(g.call_method("to", (y, torch.float32))), cast_dtype(y)
        (torch.float32, None)
    """
    if node.op != "call_method" or node.target != "to" or not node.args:
        return None
    rest = list(node.args[1:]) + list(node.kwargs.values())
    return rest[0] if len(rest) == 1 and isinstance(rest[0], torch.dtype) else None


def copy_meta(old: fx.Node, new: fx.Node) -> None:
    """Give ``new`` the output metadata of the node it replaces (same value, so same fake tensor)."""
    new.meta.update({k: v for k, v in old.meta.items() if k in ("example_value", "val", "tensor_meta", "nn_module_stack", "stack_trace")})


def shared_input_groups(graph: fx.Graph, quantizes: Callable[[fx.Node], bool]) -> list[list[fx.Node]]:
    """Linear nodes that read the same input node, in graph order, one per distinct weight, for
    every input read by two or more linears whose weight ``quantizes`` accepts.

    Example:
        >>> g = fx.Graph(); x, y, wq, wk, wo = (g.placeholder(n) for n in ("x", "y", "wq", "wk", "wo"))
        >>> q, k, o = g.call_function(F.linear, (x, wq)), g.call_function(F.linear, (x, wk)), g.call_function(F.linear, (y, wo))
        >>> shared_input_groups(g, lambda w: True) == [[q, k]]
        True
    """
    readers: dict[fx.Node, dict[fx.Node, fx.Node]] = {}
    for node in graph.nodes:
        parts = linear_parts(node)
        if parts is not None and quantizes(parts[1]):
            readers.setdefault(parts[0], {}).setdefault(parts[1], node)
    return [list(by_weight.values()) for by_weight in readers.values() if len(by_weight) > 1]


def hoist_before(anchor: fx.Node, nodes: list[fx.Node]) -> bool:
    """Move every node of ``nodes`` that comes after ``anchor`` to just before it, so that an op
    inserted before ``anchor`` can read them. Only nodes without inputs (graph inputs, ``get_attr``
    constants) can move; False, and nothing moved, when another one comes later.

    Example:
        >>> g = fx.Graph(); x = g.placeholder("x"); y = g.call_function(torch.neg, (x,)); w = g.get_attr("w")
        >>> hoist_before(y, [w]), [n.name for n in g.nodes]
        (True, ['x', 'w', 'neg'])
    """
    position = {node: i for i, node in enumerate(anchor.graph.nodes)}
    late = [n for n in nodes if position[n] > position[anchor]]
    if any(n.all_input_nodes for n in late):
        return False
    for node in late:
        anchor.prepend(node)
    return True


def is_w4a4(node: fx.Node) -> bool:
    """True for a ``svdq.w4a4_linear`` call node."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is W4A4_OP


def count_w4a4(graph: fx.Graph) -> int:
    """Number of ``svdq.w4a4_linear`` calls in ``graph``."""
    return sum(1 for n in graph.nodes if is_w4a4(n))


def count_linears(graph: fx.Graph) -> int:
    """Number of ``linear`` calls in ``graph``."""
    return sum(1 for n in graph.nodes if linear_parts(n) is not None)


__all__ = ["SVDQPass", "WeightProvider", "QuantizedNodes", "W4A4_OP", "linear_parts", "emit_w4a4", "copy_meta", "count_w4a4", "count_linears", "is_w4a4", "traced_value", "cast_dtype", "shared_input_groups", "hoist_before", "is_add", "is_mul"]
