"""Image similarity in plain torch: PSNR and SSIM, per image, for comparing 4-bit with 16-bit samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_PSNR_CAP_DB = 100.0  # identical images would give +inf; a finite cap keeps means meaningful


def psnr(images: Tensor, reference: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB of each image [B, C, H, W] against ``reference``, shape [B].

    Pixels in [0, data_range]; identical images give 100 dB.

    Example:
        >>> ref = torch.zeros(1, 1, 4, 4)
        >>> round(psnr(ref + 0.01, ref).item(), 2)  # 10 * log10(1 / 1e-4)
        40.0
    """
    _check_pair(images, reference)
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    db = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-30))
    return db.clamp(max=_PSNR_CAP_DB).float()


def _gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(images: Tensor, reference: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004) of each image [B, C, H, W] against ``reference``, shape [B].

    Pixels in [0, data_range] (the luminance term assumes black is 0: shift [-1, 1] images first).
    Gaussian window ``window`` x ``window`` (sigma 1.5), K1 = 0.01, K2 = 0.03, statistics over the
    valid region only (no padding), averaged over channels and positions. 1.0 for identical images.

    Example:
        >>> x = torch.rand(2, 1, 32, 32)
        >>> ssim(x, x).tolist()
        [1.0, 1.0]
    """
    _check_pair(images, reference)
    if min(images.shape[-2:]) < window:
        raise ValueError(f"ssim needs images of at least {window}x{window} pixels, got {tuple(images.shape[-2:])}; pass a smaller window")
    channels = images.shape[1]
    g = _gaussian_window(window, sigma)
    kernel_h = g.view(1, 1, 1, window).repeat(channels, 1, 1, 1)
    kernel_v = g.view(1, 1, window, 1).repeat(channels, 1, 1, 1)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x, kernel_h, groups=channels), kernel_v, groups=channels)

    x, y = images.double(), reference.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()


def _check_pair(images: Tensor, reference: Tensor) -> None:
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(f"expected two [B, C, H, W] tensors of one shape, got {tuple(images.shape)} and {tuple(reference.shape)}")


__all__ = ["psnr", "ssim"]
