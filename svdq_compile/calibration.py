"""Record per-channel activation statistics of every nn.Linear for the smoothing search."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .config import SVDQuantConfig
from .quantized_linear import CalibrationStats

log = logging.getLogger("svdq_compile")

# weight Parameter -> the statistics of its layer's input; keyed by identity so the backend finds
# them from the graph inputs it receives (names differ between full and regional compilation).
_STATS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def stats_for(weight: Tensor) -> CalibrationStats | None:
    """The statistics ``calibrate`` recorded for the linear owning ``weight``, or None.

    Example:
        >>> stats_for(torch.nn.Linear(4, 4).weight) is None
        True
    """
    return _STATS.get(weight)


class _Recorder:
    """Running absmax and a bounded random sample of one linear's input rows."""

    def __init__(self, calib_tokens: int, seed: int) -> None:
        self.calib_tokens = calib_tokens
        self.absmax: Tensor | None = None
        self.sample: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1]).float()
        amax = rows.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        pool = rows if self.sample is None else torch.cat((self.sample, rows))
        if pool.shape[0] > self.calib_tokens:
            keep = torch.randperm(pool.shape[0], generator=self.generator)[: self.calib_tokens]
            pool = pool[keep.to(pool.device)]
        self.sample = pool.clone()


@contextlib.contextmanager
def calibrate(module: nn.Module, config: SVDQuantConfig | None = None) -> Iterator[dict[str, CalibrationStats]]:
    """Record, during the block, the input statistics of every ``nn.Linear`` inside ``module``.

    Run real forward calls (a whole diffusers pipeline call works) inside the block, on the
    uncompiled module. At exit the statistics are kept (by weight identity) for the ``svdquant``
    backend's smoothing search, and the yielded dict is filled with ``{linear name: stats}``.
    Per layer it keeps the per-channel absmax over all tokens and at most ``config.calib_tokens``
    randomly chosen input rows (fixed seed).

    Example:
        >>> lin = torch.nn.Linear(64, 8)
        >>> with calibrate(lin) as stats:
        ...     _ = lin(torch.randn(5, 64))
        >>> stats[""].sample.shape
        torch.Size([5, 64])
    """
    config = config or SVDQuantConfig()
    recorders: dict[str, tuple[nn.Linear, _Recorder]] = {}
    handles = []
    for seed, (name, child) in enumerate(module.named_modules()):
        if isinstance(child, nn.Linear):
            recorder = _Recorder(config.calib_tokens, seed)
            recorders[name] = (child, recorder)
            handles.append(child.register_forward_hook(recorder))
    found: dict[str, CalibrationStats] = {}
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
        for name, (linear, recorder) in recorders.items():
            if recorder.absmax is not None:
                stats = CalibrationStats(absmax=recorder.absmax, sample=recorder.sample)
                _STATS[linear.weight] = stats
                found[name] = stats
        log.info("svdquant calibration: recorded %d of %d linear layers", len(found), len(recorders))


__all__ = ["calibrate", "stats_for"]
