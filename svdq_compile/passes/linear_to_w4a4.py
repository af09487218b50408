"""Replace every remaining 16-bit linear by the W4A4 SVDQuant op."""

from __future__ import annotations

from torch import fx

from .base import SVDQPass, copy_meta, emit_w4a4, linear_parts


class LinearToW4A4Pass(SVDQPass):
    """Rewrite ``linear(x, W, b)`` (``F.linear`` / ``aten.linear``, with or without bias, any leading
    dims) into ``svdq.w4a4_linear`` when the weight provider quantizes ``W``.

    Before::

        y = torch._C._nn.linear(x, W, b)

    After::

        y = torch.ops.svdq.w4a4_linear(x, W_q, scales, smooth_inv, lora_down, lora_up, b, 64)

    ``W_q, scales, smooth_inv, lora_down, lora_up`` are nodes made by the provider (extra graph
    inputs in the backend, frozen constants in the Inductor pass). ``W`` is left in the graph's
    inputs but no longer read, so the backend can free its storage. Linears whose weight the
    provider declines (skip globs, shapes that do not fit) stay as they are.

    Example:
        >>> from torch.nn import functional as F
        >>> g = fx.Graph(); x = g.placeholder("x"); w = g.placeholder("w")
        >>> _ = g.output(g.call_function(F.linear, (x, w)))
        >>> LinearToW4A4Pass(provider=type("Never", (), {"quantized_nodes": lambda *a: None})())(g)
        0
    """

    def apply(self, graph: fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            parts = linear_parts(node)
            if parts is None:
                continue
            x, weight, bias = parts
            quant = self.provider.quantized_nodes(graph, weight)
            if quant is None:
                continue
            with graph.inserting_before(node):
                fused = emit_w4a4(graph, x, quant, bias)
            copy_meta(node, fused)
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            count += 1
        return count


__all__ = ["LinearToW4A4Pass"]
