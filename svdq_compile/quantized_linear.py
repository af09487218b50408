"""A linear layer quantized with SVDQuant: its tensors, how they are made, and how it runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import numerics
from .config import FORMATS, SVDQuantConfig


@dataclass
class CalibrationStats:
    """What calibration recorded for one linear's input.

    Args:
        absmax: [K] fp32 per-channel max |x| over every calibration token.
        sample: [T, K] a few input rows (at most ``calib_tokens``) to score smoothing candidates on.
    """

    absmax: Tensor
    sample: Tensor


def smoothing_grid(step: float = 0.05) -> list[tuple[float, float]]:
    """The (alpha, beta) candidates of the reference toolbox: (0,0), (a,0) and (a,1-a), a in 0.05..0.95.

    Example:
        >>> len(smoothing_grid())
        39
    """
    steps = [round(step * i, 2) for i in range(1, round(1 / step))]
    return [(0.0, 0.0)] + [(a, 0.0) for a in steps] + [(a, round(1 - a, 2)) for a in steps]


class QuantizedLinear(nn.Module):
    """An SVDQuant linear: packed int4 residual + 16-bit low-rank branch + smoothing + bias.

    Buffers:
        qweight: [N, K/2] uint8, two int4 per byte (``numerics.pack_int4``).
        scales: [N] fp32 row scales (two-level formats) or [N, K/group] group scales in the model dtype.
        mult: [N, K/group] uint8 integer group multipliers (two-level formats only, else empty).
        smooth_inv: [K] fp32, ``1 / lambda``.
        lora_down: [R, K] model dtype, ``L2 / lambda`` so the branch reads the raw input.
        lora_up: [N, R] model dtype.
        bias: [N] or empty.

    Example:
        >>> ql = QuantizedLinear.from_linear(nn.Linear(256, 64), SVDQuantConfig(rank=8))
        >>> ql(torch.randn(4, 256)).shape
        torch.Size([4, 64])
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, format: str, alpha: float = 0.0, beta: float = 0.0) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.format = format
        self.alpha, self.beta = alpha, beta  # the smoothing chosen, for summaries

    @property
    def two_level(self) -> bool:
        """Row scales times integer group multipliers ("int4_2level", "int4_pow2")."""
        return self.format != "int4"

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: SVDQuantConfig | None = None,
        stats: CalibrationStats | None = None,
    ) -> "QuantizedLinear":
        """Quantize ``linear`` (its weight and bias) with ``config``; ``stats`` enable smoothing.

        With ``config.alpha is None`` and stats present, (alpha, beta) is searched on the grid of
        ``smoothing_grid`` by the output error on ``stats.sample`` with the whole quantized layer
        (low-rank branch included); without stats, no smoothing.

        Example:
            >>> QuantizedLinear.from_linear(nn.Linear(128, 32)).rank
            32
        """
        return cls.from_weight(linear.weight, linear.bias, config, stats)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        config: SVDQuantConfig | None = None,
        stats: CalibrationStats | None = None,
    ) -> "QuantizedLinear":
        """``from_linear`` for a bare weight [N, K] and bias (as FX graphs hold them).

        Example:
            >>> QuantizedLinear.from_weight(torch.randn(32, 128), None, SVDQuantConfig(rank=4)).rank
            4
        """
        config = config or SVDQuantConfig()
        weight = weight.detach()
        n, k = weight.shape
        if k % config.group_size:
            raise ValueError(f"in_features ({k}) must be a multiple of group_size ({config.group_size})")
        if config.alpha is not None:
            candidates = [(config.alpha, config.beta)]
        elif stats is not None:
            candidates = smoothing_grid()
        else:
            candidates = [(0.0, 0.0)]
        best, best_err = None, float("inf")
        for alpha, beta in candidates:
            layer = cls._quantize(weight, bias, config, stats, alpha, beta)
            if len(candidates) == 1:
                return layer
            err = layer.output_error(weight, bias, stats.sample)
            if err < best_err:
                best, best_err = layer, err
        return best

    @classmethod
    def _quantize(cls, weight: Tensor, bias: Tensor | None, config: SVDQuantConfig, stats: CalibrationStats | None, alpha: float, beta: float) -> "QuantizedLinear":
        n, k = weight.shape
        dtype = weight.dtype
        pow2 = config.format == "int4_pow2"
        lam = numerics.smoothing_factors(None if stats is None else stats.absmax, weight, alpha, beta)
        w_hat = weight.float() * lam
        up, down = numerics.lowrank_svd(w_hat, config.rank)
        q, scales, mult = numerics.quantize_weight(w_hat - up @ down, config.group_size, config.two_level, dtype, pow2)
        if config.refine_iters:
            # Refinement: re-fit the low-rank part to what quantization left out, keep the best round
            # by weight error (the residual's quantization error plus what the branch misses).
            best = None
            for step in range(config.refine_iters + 1):
                deq = numerics.dequantize_weight(q, scales, mult, config.group_size)
                err = torch.linalg.matrix_norm(w_hat - up @ down - deq).item()
                if best is None or err < best[0]:
                    best = (err, q, scales, mult, up, down)
                if step < config.refine_iters:
                    up, down = numerics.lowrank_svd(w_hat - deq, config.rank)
                    q, scales, mult = numerics.quantize_weight(w_hat - up @ down, config.group_size, config.two_level, dtype, pow2)
            _, q, scales, mult, up, down = best
        layer = cls(k, n, config.group_size, config.format, alpha, beta)
        layer.register_buffer("qweight", numerics.pack_int4(q))
        layer.register_buffer("scales", scales)
        layer.register_buffer("mult", mult if mult is not None else torch.empty(0, dtype=torch.uint8, device=weight.device))
        layer.register_buffer("smooth_inv", (1.0 / lam).float())
        # contiguous, as a cache or checkpoint returns them: BLAS picks its kernel (and so its
        # rounding) by layout, and a reloaded layer must compute bit for bit what a fresh one does
        layer.register_buffer("lora_down", (down / lam).to(dtype).contiguous())
        layer.register_buffer("lora_up", up.to(dtype).contiguous())
        layer.register_buffer("bias", bias.detach().clone() if bias is not None else torch.empty(0, dtype=dtype, device=weight.device))
        return layer

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    def weight_operand(self) -> Tensor:
        """The [N, K] GEMM operand the kernels read: ``q * mult`` (two-level) or ``q``, int8, or
        float8_e4m3fn holding the same integers for "int4_pow2".

        Example:
            >>> QuantizedLinear.from_linear(nn.Linear(128, 8)).weight_operand().dtype
            torch.int8
        """
        q = numerics.unpack_int4(self.qweight)
        return numerics.expand_2level(q, self.mult, self.group_size, fp8=self.format == "int4_pow2") if self.two_level else q

    def dequantize(self) -> Tensor:
        """The effective float weight [N, K] (fp32) that this layer applies to unquantized inputs.

        Quantized residual plus low-rank branch, with the smoothing undone; for debugging and error
        reports (the activations' quantization is not in it).

        Example:
            >>> lin = nn.Linear(128, 16)
            >>> err = QuantizedLinear.from_linear(lin).dequantize() - lin.weight
            >>> bool(err.abs().max() < lin.weight.abs().max())
            True
        """
        residual = numerics.dequantize_weight(numerics.unpack_int4(self.qweight), self.scales, self.mult if self.two_level else None, self.group_size)
        return residual * self.smooth_inv + self.lora_up.float() @ self.lora_down.float()

    def forward(self, x: Tensor) -> Tensor:
        from .ops import w4a4_linear

        bias = self.bias if self.bias.numel() else None
        return w4a4_linear(x, self.weight_operand(), self.scales, self.smooth_inv, self.lora_down, self.lora_up, bias, self.group_size)

    def output_error(self, weight: Tensor, bias: Tensor | None, x: Tensor) -> float:
        """Relative output error ``|y_q - y| / |y|`` of this layer against the float layer on ``x``.

        Example:
            >>> lin = nn.Linear(128, 16)
            >>> QuantizedLinear.from_linear(lin).output_error(lin.weight, lin.bias, torch.randn(8, 128)) < 0.5
            True
        """
        with torch.no_grad():
            x = x.to(weight.device, weight.dtype)
            ref = nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
            out = self(x).float()
            return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, format={self.format}, smoothing=({self.alpha}, {self.beta})"


__all__ = ["QuantizedLinear", "CalibrationStats", "smoothing_grid"]
