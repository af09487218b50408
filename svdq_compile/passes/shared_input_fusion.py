"""Run the quantized linears that read one input as one W4A4 op over their concatenated weights."""

from __future__ import annotations

import operator

import torch
from torch import fx

from .base import SVDQPass, copy_meta, emit_w4a4, hoist_before, linear_parts, shared_input_groups, traced_value


class SharedInputFusionPass(SVDQPass):
    """Replace the linears that read the same ``x`` (attention's q/k/v, FLUX single blocks'
    q/k/v and ``proj_mlp``) by one ``svdq.w4a4_linear`` whose output is split back into theirs, so
    ``x`` is quantized once and the GEMM is one wider matrix instead of several narrow ones.

    Before::

        q = linear(x, Wq, bq);  k = linear(x, Wk);  v = linear(x, Wv, bv)

    After::

        b = torch.cat([bq, bq.new_zeros((Nk,)), bv])
        y = svdq.w4a4_linear(x, W_q, scales, smooth_inv, lora_down, lora_up, b, 64)
        q, k, v = torch.split(y, [Nq, Nk, Nv], -1)   # views: the members' columns of y

    The operands are those of one SVDQuant layer of the concatenated weight ``[Wq; Wk; Wv]`` (one
    shared smoothing, one SVD); the provider supplies them (``joint_quantized_nodes``) or declines,
    and a declined group is left to ``LinearToW4A4Pass``, one op per linear. Linears whose weight
    the provider quantizes take part, those with LoRA adapters too: ``LoraLinearFusionPass`` runs
    next and folds the adapters added onto a member's output into the group's op. A skipped linear
    stays 16-bit, leaving the others grouped (or alone, if one remains).

    Example:
        >>> from torch.nn import functional as F
        >>> g = fx.Graph(); x, wq, wk = g.placeholder("x"), g.placeholder("wq"), g.placeholder("wk")
        >>> _ = g.output((g.call_function(F.linear, (x, wq)), g.call_function(F.linear, (x, wk))))
        >>> declines = type("Declines", (), {"quantizes": lambda s, w: True, "joint_quantized_nodes": lambda *a: None})()
        >>> SharedInputFusionPass(declines)(g)
        0
    """

    def apply(self, graph: fx.Graph) -> int:
        count = 0
        for linears in shared_input_groups(graph, self.provider.quantizes):
            count += self._fuse(graph, linears)
        return count

    def _fuse(self, graph: fx.Graph, linears: list[fx.Node]) -> bool:
        x, weights, biases = linear_parts(linears[0])[0], [], []
        for node in linears:
            _, weight, bias = linear_parts(node)
            weights.append(weight)
            biases.append(bias)
        shapes = [_shape(w) for w in weights]
        if any(s is None or len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) > 1:
            return False
        first = linears[0]
        if not hoist_before(first, [n for n in weights + biases if n is not None]):
            return False
        quant = self.provider.joint_quantized_nodes(graph, weights)
        if quant is None:
            return False
        sizes = [s[0] for s in shapes]
        with graph.inserting_before(first):
            fused = emit_w4a4(graph, x, quant, _joint_bias(graph, biases, sizes))
            pieces = graph.call_function(torch.split, (fused, sizes, -1))
            outputs = [graph.call_function(operator.getitem, (pieces, i)) for i in range(len(linears))]
        for node, output in zip(linears, outputs):
            copy_meta(node, output)
            node.replace_all_uses_with(output)
            graph.erase_node(node)
        return True


def _joint_bias(graph: fx.Graph, biases: list[fx.Node | None], sizes: list[int]) -> fx.Node | None:
    """The members' biases concatenated, zeros for a member without one; None when none has one."""
    present = next((b for b in biases if b is not None), None)
    if present is None:
        return None
    parts = [b if b is not None else graph.call_method("new_zeros", (present, (n,))) for b, n in zip(biases, sizes)]
    return graph.call_function(torch.cat, (parts,))


def _shape(node: fx.Node) -> torch.Size | None:
    """Shape of a weight node: its traced value, or the module attribute a ``get_attr`` reads."""
    value = traced_value(node)
    if value is None and node.op == "get_attr" and node.graph.owning_module is not None:
        value = node.graph.owning_module
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
    return value.shape if isinstance(value, torch.Tensor) else None


__all__ = ["SharedInputFusionPass"]
