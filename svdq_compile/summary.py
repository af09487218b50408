"""The one-screen report of what a svdquant compile did, and its progress bar."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

log = logging.getLogger("svdq_compile")

# A progress bar only pays for itself when quantization takes a while.
PROGRESS_MIN_LAYERS = 8
_MAX_NAMED_SKIPS = 12


def _ensure_visible() -> None:
    """Show svdq_compile's INFO messages on stderr unless the application configured logging."""
    if not log.handlers and log.level == logging.NOTSET and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


@dataclass
class CompileSummary:
    """What one compiled graph quantized and skipped (and why), bytes before/after, and time.

    Example:
        >>> s = CompileSummary()
        >>> s.skipped("proj_out", "skip glob 'proj_out'")
        >>> print(s.text(free_weights=True).splitlines()[1])
        svdquant: 0 linears quantized, 1 kept in 16-bit
    """

    layers: list[tuple[str, int, int, float, str]] = field(default_factory=list)  # name, bytes before, after, seconds, origin
    skips: list[tuple[str, str]] = field(default_factory=list)
    rewrites: dict[str, int] = field(default_factory=dict)
    compile_seconds: float = 0.0

    def quantized(self, name: str, weight: Tensor, entry: Any, fresh: bool) -> None:
        """Record a quantized layer; ``fresh`` is False when an earlier compile already quantized it."""
        origin = ("disk cache" if entry.from_cache else "computed") if fresh else "reused"
        self.layers.append((name, weight.numel() * weight.element_size(), entry.nbytes(), entry.seconds if fresh else 0.0, origin))

    def skipped(self, name: str, reason: str) -> None:
        self.skips.append((name, reason))

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[Any]:
        """A tqdm bar over ``total`` layers to quantize (None when there are only a few)."""
        if total < PROGRESS_MIN_LAYERS:
            yield None
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, desc="svdquant: quantizing linears", unit="layer") as bar:
            yield bar

    def text(self, free_weights: bool) -> str:
        before = sum(layer[1] for layer in self.layers)
        after = sum(layer[2] for layer in self.layers)
        seconds = sum(layer[3] for layer in self.layers)
        origins = Counter(layer[4] for layer in self.layers)
        lines = [
            "-" * 72,
            f"svdquant: {len(self.layers)} linears quantized, {len(self.skips)} kept in 16-bit",
            f"  rewrites: {', '.join(f'{k} {v}' for k, v in self.rewrites.items()) or 'none'}",
            f"  weight bytes of quantized layers: {_mib(before)} 16-bit -> {_mib(after)} W4A4 operands"
            + (f" ({before / after:.2f}x smaller)" if after else ""),
            f"  quantizing: {seconds:.1f} s ({', '.join(f'{v} {k}' for k, v in sorted(origins.items())) or 'nothing'}); Inductor compile: {self.compile_seconds:.1f} s",
        ]
        if self.layers and free_weights:
            lines.append("  the 16-bit weights of quantized layers are freed after the first call (options free_weights=False keeps them)")
        by_reason = Counter(reason for _, reason in self.skips)
        for reason, count in by_reason.most_common():
            names = [name for name, r in self.skips if r == reason]
            shown = ", ".join(names[:_MAX_NAMED_SKIPS]) + (", ..." if len(names) > _MAX_NAMED_SKIPS else "")
            lines.append(f"  kept 16-bit ({count}) {reason}: {shown}")
        lines.append("-" * 72)
        return "\n".join(lines)

    def report(self, free_weights: bool) -> None:
        """Log the summary at INFO on the ``svdq_compile`` logger."""
        _ensure_visible()
        log.info(self.text(free_weights))


__all__ = ["CompileSummary"]
