"""Disk cache of quantized layers, so a second process skips the SVD and the smoothing search.

One safetensors file per layer (linears that read one input and are quantized together are one
layer, its weight their concatenated weights), named by a hash of: the weight's content (a 128-bit fingerprint
computed on the weight's own device, see ``weight_fingerprint``), its shape and dtype,
``config.quantization_key()``, and the calibration statistics when present. Location, first that
is set: ``config.cache_dir``, ``$SVDQ_CACHE_DIR``, ``~/.cache/svdq_compile``; ``cache_dir=""``
disables it. Files are written atomically (temp file + rename), so parallel processes are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import SVDQuantConfig
from .quantized_linear import CalibrationStats, QuantizedLinear

FORMAT_VERSION = 2  # bump when QuantizedLinear's buffers, the file's metadata or the numerics change meaning
_CHUNK = 1 << 24
_BUFFERS = ("qweight", "scales", "mult", "smooth_inv", "lora_down", "lora_up")


def cache_dir(config: SVDQuantConfig) -> Path | None:
    """The cache folder for ``config``, or None when caching is off.

    Example:
        >>> cache_dir(SVDQuantConfig(cache_dir="")) is None
        True
    """
    location = config.cache_dir if config.cache_dir is not None else os.environ.get("SVDQ_CACHE_DIR")
    if location == "":
        return None
    return Path(location or Path.home() / ".cache" / "svdq_compile")


def weight_fingerprint(weight: Tensor) -> tuple[int, int]:
    """Two 64-bit sums of the weight's bit patterns times position-dependent odd multipliers.

    Computed on the weight's device in int64 wrap-around arithmetic (order-independent, so the same
    on CPU and GPU), a few GPU milliseconds for a FLUX layer where hashing bytes on the CPU would
    cost a device-to-host copy of the whole model. Any single changed element changes both sums.

    Example:
        >>> w = torch.randn(8, 64)
        >>> weight_fingerprint(w) == weight_fingerprint(w.clone()), weight_fingerprint(w) == weight_fingerprint(w * 2)
        (True, False)
    """
    flat = weight.detach().contiguous().reshape(-1)
    bits_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    bits = flat.view(bits_dtype)
    sums = [0, 0]
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start : start + _CHUNK].to(torch.int64)
        position = torch.arange(start, start + chunk.numel(), device=chunk.device, dtype=torch.int64)
        for i, seed in enumerate((0x5851F42D4C957F2D, 0x2545F4914F6CDD1D)):
            mixed = (position + i) * seed
            mixed = mixed ^ (mixed >> 29)
            sums[i] = (sums[i] + int(((mixed * 2 + 1) * (chunk + 1)).sum())) % (1 << 64)
    return sums[0], sums[1]


def _stats_digest(stats: CalibrationStats | None) -> str:
    if stats is None:
        return "none"
    digest = hashlib.sha256()
    for t in (stats.absmax, stats.sample):
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def layer_key(weight: Tensor, config: SVDQuantConfig, stats: CalibrationStats | None) -> str:
    """Cache key of quantizing ``weight`` with ``config`` (and ``stats``).

    Example:
        >>> w = torch.randn(8, 64)
        >>> layer_key(w, SVDQuantConfig(), None) != layer_key(w, SVDQuantConfig(rank=4), None)
        True
    """
    desc = {
        "version": FORMAT_VERSION,
        "shape": list(weight.shape),
        "dtype": str(weight.dtype),
        "fingerprint": weight_fingerprint(weight),
        "config": config.quantization_key(),
        "stats": _stats_digest(stats),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:40]


def load(config: SVDQuantConfig, key: str, device: torch.device) -> QuantizedLinear | None:
    """The cached layer for ``key`` on ``device``, or None (no cache, no file, unreadable file)."""
    folder = cache_dir(config)
    path = folder / f"{key}.safetensors" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path), device=str(device))
    except Exception:  # a truncated or foreign file is a cache miss, not an error
        return None
    layer = QuantizedLinear(int(meta["in_features"]), int(meta["out_features"]), int(meta["group_size"]), meta["format"], float(meta["alpha"]), float(meta["beta"]))
    for name in _BUFFERS:
        layer.register_buffer(name, tensors[name])
    layer.register_buffer("bias", tensors["bias"])
    return layer


def save(config: SVDQuantConfig, key: str, layer: QuantizedLinear) -> Path | None:
    """Write ``layer`` under ``key``; returns the file, or None when caching is off."""
    folder = cache_dir(config)
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    tensors = {name: getattr(layer, name).detach().contiguous().cpu() for name in _BUFFERS + ("bias",)}
    meta = {
        "in_features": str(layer.in_features),
        "out_features": str(layer.out_features),
        "group_size": str(layer.group_size),
        "format": layer.format,
        "alpha": repr(layer.alpha),
        "beta": repr(layer.beta),
    }
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


__all__ = ["cache_dir", "weight_fingerprint", "layer_key", "load", "save"]
