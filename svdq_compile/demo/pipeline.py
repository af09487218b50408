"""Sampling digits from the demo transformer: rectified flow, Euler steps, classifier-free guidance.

The model predicts the velocity ``v = noise - image`` of the straight path
``x_t = (1 - t) * image + t * noise``; sampling integrates from t = 1 (noise) to t = 0. The
transformer's timestep input is ``1000 * t`` (DiT's sinusoidal embedding expects that range).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import SVDQuantConfig
from ..quantized_linear import CalibrationStats, QuantizedLinear

from .digits import IMAGE_SIZE
from .model import NULL_CLASS

TIMESTEP_SCALE = 1000.0


def initial_noise(count: int, seed: int) -> Tensor:
    """fp32 CPU noise [count, 1, 32, 32]; image i depends only on (seed, i), not on ``count``.

    Example:
        >>> torch.equal(initial_noise(3, 0)[:2], initial_noise(2, 0))
        True
    """
    return torch.stack([torch.randn(1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed * 100_003 + i)) for i in range(count)])


class DigitPipeline:
    """Draw digits with a (possibly quantized or compiled) demo transformer.

    Args:
        transformer: ``DiTTransformer2DModel``-like callable ``(x, timestep=, class_labels=) -> .sample``.
        guidance_scale: classifier-free guidance weight; 1.0 disables the unconditional branch.
        batch_size: images per transformer call (the guided batch is twice this).

    Example:
        >>> from svdq_compile.demo.model import build_transformer
        >>> pipe = DigitPipeline(build_transformer(), guidance_scale=2.0)
        >>> pipe([3, 5], steps=2, seed=0, progress=False).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, transformer: Callable[..., object], guidance_scale: float = 3.0, batch_size: int = 64) -> None:
        self.transformer = transformer
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size

    def _velocity(self, x: Tensor, t: float, labels: Tensor) -> Tensor:
        guided = self.guidance_scale != 1.0
        x_in = torch.cat([x, x]) if guided else x
        labels_in = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if guided else labels
        timestep = torch.full((x_in.shape[0],), t * TIMESTEP_SCALE, device=x.device)
        v = self.transformer(x_in, timestep=timestep, class_labels=labels_in).sample.float()
        if not guided:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def __call__(self, labels: list[int] | Tensor, steps: int = 20, seed: int = 0, progress: bool = True, desc: str = "sampling") -> Tensor:
        """fp32 CPU images [len(labels), 1, 32, 32] in [-1, 1]; image i is seeded by ``(seed, i)``.

        The state is kept in fp32 between steps; the transformer sees it in its own dtype.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        param = next(iter(_parameters(self.transformer)), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
        noise = initial_noise(len(labels), seed)
        times = torch.linspace(1.0, 0.0, steps + 1).tolist()
        batches = list(range(0, len(labels), self.batch_size))
        bar = tqdm(total=steps * len(batches), desc=desc, unit="step", disable=not progress, leave=False)
        out = []
        for start in batches:
            x = noise[start : start + self.batch_size].to(device)
            y = labels[start : start + self.batch_size].to(device)
            for t, t_next in zip(times[:-1], times[1:]):
                v = self._velocity(x.to(dtype), t, y)
                x = x + (t_next - t) * v
                bar.update(1)
            out.append(x.clamp(-1, 1).cpu())
        bar.close()
        return torch.cat(out)


def _parameters(module: object) -> list[Tensor]:
    # A compiled module (OptimizedModule) exposes its original's parameters the same way.
    return list(module.parameters()) if hasattr(module, "parameters") else []


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (same shape).

    Example:
        >>> to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist()
        [0, 128, 255]
    """
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def quantize_linears(
    module: nn.Module,
    config: SVDQuantConfig,
    stats: dict[str, CalibrationStats] | None = None,
    progress: bool = True,
) -> list[str]:
    """Swap, in place, every linear the ``svdquant`` backend would quantize for a ``QuantizedLinear``.

    The eager reference of the backend's rewrite (same eligibility rules, same op): the quality
    harness uses it to compare configurations without an Inductor compile per configuration.
    ``stats`` maps linear names to calibration statistics (as ``svdq_compile.calibrate`` yields).
    Returns the names of the swapped layers.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> with torch.no_grad():
        ...     quantize_linears(model, SVDQuantConfig(rank=4, skip=()), progress=False)
        ['0']
    """
    from ..backend import skip_reason

    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, nn.Linear) and skip_reason(name, child.weight, config) is None]
    for name, linear in tqdm(targets, desc="quantizing linears (eager)", unit="layer", disable=not progress, leave=False):
        parent_name, _, attr = name.rpartition(".")
        quantized = QuantizedLinear.from_linear(linear, config, (stats or {}).get(name))
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, quantized)
    return [name for name, _ in targets]


__all__ = ["DigitPipeline", "initial_noise", "to_uint8", "quantize_linears", "TIMESTEP_SCALE"]
