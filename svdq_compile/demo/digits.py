"""Digits 0-9 rendered with Pillow's built-in scalable font: the demo's training and scoring data.

Only ``ImageFont.load_default(size=...)`` is used (Pillow >= 10.1 with FreeType embeds that font), so
the same seed gives the same images on every machine. Variety comes from size, stroke width,
rotation, shear and offset.
"""

from __future__ import annotations

import math
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

IMAGE_SIZE = 32
_CANVAS = 64  # rendered at twice the size, then box-filtered down: anti-aliased strokes


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("the digit renderer needs Pillow >= 10.1 built with FreeType (ImageFont.load_default(size=...))")
    return font


def render_digit(digit: int, rng: random.Random) -> Image.Image:
    """One 32x32 grayscale image ("L", white digit on black) of ``digit`` with random style from ``rng``.

    Example:
        >>> render_digit(5, random.Random(0)).size
        (32, 32)
    """
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    size = rng.randint(30, 50)
    stroke = rng.randint(0, size // 20)  # bolder only for larger glyphs: thick small digits blot
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((_CANVAS / 2, _CANVAS / 2), str(digit), fill=255, font=_font(size), anchor="mm", stroke_width=stroke, stroke_fill=255)
    # One affine map: rotation, horizontal shear (a slant) and offset, about the canvas centre.
    angle = math.radians(rng.uniform(-18, 18))
    shear = rng.uniform(-0.3, 0.3)
    dx, dy = rng.uniform(-6, 6), rng.uniform(-6, 6)
    cos, sin = math.cos(angle), math.sin(angle)
    a, b, d, e = cos, sin + shear * cos, -sin, cos - shear * sin  # output -> input (inverse) map
    c0 = _CANVAS / 2
    c = c0 - a * (c0 + dx) - b * (c0 + dy)
    f = c0 - d * (c0 + dx) - e * (c0 + dy)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _render_chunk(args: tuple[list[int], int]) -> bytes:
    # Plain bytes, no torch, in the worker: torch's thread pools do not survive a fork.
    digits, seed = args
    rng = random.Random(seed)
    return b"".join(render_digit(d, rng).tobytes() for d in digits)


def render_digits(digits: list[int], seed: int, workers: int = 1) -> Tensor:
    """uint8 images [len(digits), 1, 32, 32] of the given digits; the same seed gives the same images.

    Chunks of 1024 images each get their own seed (derived from ``seed``), so the result does not
    depend on ``workers``.

    Example:
        >>> render_digits([1, 2, 3], seed=0).dtype
        torch.uint8
    """
    chunks = [(digits[i : i + 1024], seed * 1_000_003 + i) for i in range(0, len(digits), 1024)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_render_chunk, chunks))
    else:
        parts = [_render_chunk(c) for c in chunks]
    data = torch.tensor(bytearray(b"".join(parts)), dtype=torch.uint8)
    return data.view(len(digits), 1, IMAGE_SIZE, IMAGE_SIZE)


def make_dataset(count: int, seed: int, workers: int = 1) -> tuple[Tensor, Tensor]:
    """``(images uint8 [count, 1, 32, 32], labels int64 [count])`` with balanced, shuffled labels.

    Example:
        >>> images, labels = make_dataset(20, seed=1)
        >>> sorted(labels.tolist()) == sorted(list(range(10)) * 2)
        True
    """
    labels = torch.arange(count) % 10
    labels = labels[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]
    return render_digits(labels.tolist(), seed, workers), labels


__all__ = ["IMAGE_SIZE", "render_digit", "render_digits", "make_dataset"]
