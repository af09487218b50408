"""Run the svdquant passes in their fixed order."""

from __future__ import annotations

import hashlib

from torch import fx

from ..config import SVDQuantConfig
from .base import SVDQPass, WeightProvider
from .cat_input_fusion import CatInputFusionPass
from .gelu_epilogue_fusion import GeluEpilogueFusionPass
from .linear_to_w4a4 import LinearToW4A4Pass
from .lora_linear_fusion import LoraLinearFusionPass
from .shared_input_fusion import SharedInputFusionPass

# (config flag, pass class), in the order they run: shared-input fusion first, so that linears with
# LoRA adapters stay in their group (q/k/v); LoRA fusion next, folding adapters into the group ops
# and into ops of their own for the other linears (once a base linear is rewritten without them,
# the adapters could only stay a separate 16-bit branch); the one-by-one rewrite takes whatever is
# left; then the passes that fold a W4A4 op's neighbours (the GELU after it, the concatenation
# before it) into the op.
PASSES: tuple[tuple[str, type[SVDQPass]], ...] = (
    ("fuse_shared_input", SharedInputFusionPass),
    ("fuse_lora", LoraLinearFusionPass),
    ("quantize_linear", LinearToW4A4Pass),
    ("fuse_gelu", GeluEpilogueFusionPass),
    ("fuse_cat_input", CatInputFusionPass),
)


class SVDQPassManager:
    """Apply the enabled passes to a graph; returns ``{pass name: rewrites}``.

    Example:
        >>> never = type("Never", (), {"quantized_nodes": lambda *a: None, "quantizes": lambda *a: False})()
        >>> SVDQPassManager(SVDQuantConfig(), never)(fx.Graph())
        {'SharedInputFusionPass': 0, 'LoraLinearFusionPass': 0, 'LinearToW4A4Pass': 0, 'GeluEpilogueFusionPass': 0, 'CatInputFusionPass': 0}
    """

    def __init__(self, config: SVDQuantConfig, provider: WeightProvider) -> None:
        self.passes = [cls(provider) for flag, cls in PASSES if getattr(config, flag)]

    def __call__(self, graph: fx.Graph) -> dict[str, int]:
        return {type(p).__name__: p(graph) for p in self.passes}

    @staticmethod
    def uuid(config: SVDQuantConfig) -> str:
        """Hash of every pass's source plus the config's quantization fields and pass flags."""
        parts = [cls.uuid() for flag, cls in PASSES if getattr(config, flag)]
        parts.append(repr(sorted(config.quantization_key().items())))
        parts.append(repr(sorted(config.skip)))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


__all__ = ["SVDQPassManager", "PASSES"]
