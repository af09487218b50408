"""The demo's two networks: a small class-conditional DiT (diffusers) that draws digits, and a CNN that reads them.

The transformer works in pixel space (1 x 32 x 32, patch 4: 64 tokens, small enough to sample on a
CPU). Every quantized linear's input and output width is a multiple of 64 (group size 64); the
final projection to 4 x 4 pixels and the embedders stay 16-bit (``DEMO_SKIP``), as the reference
engine keeps embedders and output projections of FLUX in 16-bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DEFAULT_SKIP

WEIGHTS_DIR = Path(__file__).parent / "weights"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label-dropout class: the unconditional branch of classifier-free guidance

TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 3,
    "attention_head_dim": 64,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": 32,
    "patch_size": 4,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}

# DiT's names for what DEFAULT_SKIP keeps 16-bit in other models: the per-block timestep/label
# embedders and the output layer (whose 16 outputs per token are not worth a 4-bit kernel).
DEMO_SKIP = DEFAULT_SKIP + ("*.norm1.emb.*", "proj_out_1", "proj_out_2")


class DigitClassifier(nn.Module):
    """A small CNN: [B, 1, 32, 32] images in [-1, 1] -> [B, 10] logits.

    Example:
        >>> DigitClassifier()(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).flatten(1))


def build_transformer(config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised ``DiTTransformer2DModel`` with the demo's (or the given) config.

    Example:
        >>> sum(p.numel() for p in build_transformer().parameters()) > 1_000_000
        True
    """
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**(config or TRANSFORMER_CONFIG))


@dataclass
class DemoModels:
    """The shipped demo: transformer, classifier, and the sampler defaults it was trained for."""

    transformer: nn.Module
    classifier: DigitClassifier
    config: dict[str, Any]


def load_demo(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, weights_dir: Path | str = WEIGHTS_DIR) -> DemoModels:
    """Load the shipped transformer and classifier (eval mode) from ``weights_dir``.

    Example:
        >>> demo = load_demo()
        >>> demo.config["sampler"]["steps"] > 0
        True
    """
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    config_path = weights_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no demo weights in {weights_dir}; train them with `python -m svdq_compile.demo.train --out {weights_dir}`")
    config = json.loads(config_path.read_text())
    transformer = build_transformer(config["transformer"])
    transformer.load_state_dict(load_file(weights_dir / "transformer.safetensors"))
    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(weights_dir / "classifier.safetensors"))
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # DiT has no fp32-only modules; its warning about a cast would only confuse
    try:
        transformer = transformer.to(device, dtype).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return DemoModels(transformer, classifier.to(device, torch.float32).eval(), config)


def classify(classifier: DigitClassifier, images: Tensor, batch_size: int = 512) -> Tensor:
    """Predicted digits [B] for images [B, 1, 32, 32] in [-1, 1] (any float dtype).

    Example:
        >>> classify(DigitClassifier(), torch.zeros(3, 1, 32, 32)).shape
        torch.Size([3])
    """
    param = next(classifier.parameters())
    with torch.no_grad():
        return torch.cat([classifier(chunk.to(param.device, param.dtype)).argmax(-1).cpu() for chunk in images.split(batch_size)])


__all__ = ["WEIGHTS_DIR", "NUM_CLASSES", "NULL_CLASS", "TRANSFORMER_CONFIG", "DEMO_SKIP", "DigitClassifier", "build_transformer", "DemoModels", "load_demo", "classify"]
