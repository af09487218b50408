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

# (config flag, pass class), in the order they run: LoRA fusion first, because once the base linear
# of a LoRA is rewritten alone the adapters could only stay a separate 16-bit branch; shared-input
# fusion before the one-by-one rewrite, which takes whatever is left; then the passes that fold a
# W4A4 op's neighbours (the GELU after it, the concatenation before it) into the op.
PASSES: tuple[tuple[str, type[SVDQPass]], ...] = (
    ("fuse_lora", LoraLinearFusionPass),
    ("fuse_shared_input", SharedInputFusionPass),
    ("quantize_linear", LinearToW4A4Pass),
    ("fuse_gelu", GeluEpilogueFusionPass),
    ("fuse_cat_input", CatInputFusionPass),
)


class SVDQPassManager:
    """Apply the enabled passes to a graph; returns ``{pass name: rewrites}``.

    Example:
        >>> never = type("Never", (), {"quantized_nodes": lambda *a: None, "quantizes": lambda *a: False})()
        >>> SVDQPassManager(SVDQuantConfig(), never)(fx.Graph())
        {'LoraLinearFusionPass': 0, 'SharedInputFusionPass': 0, 'LinearToW4A4Pass': 0, 'GeluEpilogueFusionPass': 0, 'CatInputFusionPass': 0}
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
