"""``svdq-compile generate``: draw images with a 16-bit pipeline and the same pipeline compiled to 4-bit.

With no arguments it runs the embedded digit model (svdq_compile/demo), writes one PNG with the
16-bit and the 4-bit samples side by side, and prints weight memory, time per image, PSNR/SSIM of
4-bit against 16-bit, and the digit classifier's accuracy on both. ``--model`` runs any diffusers
pipeline that is available locally instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import FORMATS
from .metrics import psnr, ssim

DEFAULT_OUT = "svdq_compare.png"


class CliError(Exception):
    """A user-facing problem: printed as one line, exit code 2, no traceback."""


@dataclass
class Run:
    """What one precision produced: images in [-1, 1] [B, C, H, W] (fp32, CPU) and seconds per image."""

    images: Tensor
    seconds_per_image: float


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdq-compile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="16-bit vs 4-bit (backend='svdquant') images, side by side, with a quality summary")
    gen.add_argument("--model", help="a diffusers pipeline id or folder available locally (default: the embedded digit model)")
    gen.add_argument("--prompt", help="text prompt; for the embedded model, the digits to draw (e.g. '042')")
    gen.add_argument("--steps", type=int, help="sampling steps (default: 20 on a GPU, 12 on CPU for the embedded model; 28 for --model)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--rank", type=int, default=32, help="rank of the 16-bit low-rank branch")
    gen.add_argument("--format", default="int4_2level", choices=FORMATS, help="4-bit numerics (see SVDQuantConfig)")
    gen.add_argument("--calibrate", type=int, default=0, metavar="N", help="calibrate smoothing on N prompts (classes for the embedded model) first")
    gen.add_argument("--per-class", type=int, default=4, help="embedded model: samples per digit")
    gen.add_argument("--out", default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``svdq-compile`` console script and of ``python -m svdq_compile``.

    Example:
        >>> main(["generate", "--model", "/nonexistent/model"])  # doctest: +SKIP
        2
    """
    args = _parser().parse_args(argv)
    try:
        generate(args)
    except CliError as err:
        print(f"svdq-compile: {err}", file=sys.stderr)
        return 2
    return 0


def output_path(out: str) -> Path:
    """Where ``generate`` writes its PNG, checked before any work: a folder gets the default file
    name, a missing parent folder is made, and anything but a ``.png`` path is a CliError.

    Example:
        >>> output_path("."), output_path("grid.png")
        (PosixPath('svdq_compare.png'), PosixPath('grid.png'))
    """
    path = Path(out)
    if path.is_dir():
        return path / DEFAULT_OUT
    if path.suffix.lower() != ".png":
        raise CliError(f"--out {out!r}: give a .png file (e.g. --out {path.with_suffix('.png')}) or an existing folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def generate(args: argparse.Namespace) -> None:
    """Run the ``generate`` command (see the module docstring)."""
    args.out = output_path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = {"rank": args.rank, "format": args.format}
    if args.model:
        _generate_diffusers(args, device, options)
    else:
        _generate_embedded(args, device, options)


# ---------------------------------------------------------------------------------------------
# Shared: timing, compiling, memory, the side-by-side PNG, the summary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, count: int, fn: Callable[[], Tensor]) -> Run:
    _sync(device)
    start = time.perf_counter()
    images = fn()
    _sync(device)
    return Run(images, (time.perf_counter() - start) / count)


def _compile_4bit(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    # The backend quantizes at the first call, and frees the 16-bit weights after it: the 16-bit
    # run must come first.
    return torch.compile(model, backend="svdquant", options=options)


def _weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(16-bit bytes of every parameter, bytes after the latest svdquant compile)."""
    from .backend import recent_summaries

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not recent_summaries:
        return total, total
    layers = recent_summaries[-1].layers
    return total, total - sum(layer[1] for layer in layers) + sum(layer[2] for layer in layers)


def _side_by_side(left: Tensor, right: Tensor, columns: int, titles: tuple[str, str], footer: str, scale: int) -> "Image.Image":
    """Two image grids (uint8 [B, C, H, W]) next to each other, each titled, with a footer line."""
    from PIL import Image, ImageDraw, ImageFont

    def grid(images: Tensor) -> Image.Image:
        b, c, h, w = images.shape
        rows = -(-b // columns)
        padded = torch.zeros(rows * columns, c, h, w, dtype=torch.uint8)
        padded[:b] = images
        g = padded.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
        img = Image.fromarray(g.squeeze(-1).numpy() if c == 1 else g.numpy())
        return img.convert("RGB").resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)

    panels = [grid(left), grid(right)]
    font = ImageFont.load_default(size=16)
    gap, top, bottom = 16, 28, 28
    width = sum(p.width for p in panels) + 3 * gap
    height = max(p.height for p in panels) + top + bottom
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = gap
    for panel, title in zip(panels, titles):
        canvas.paste(panel, (x, top))
        draw.text((x, 6), title, fill=(0, 0, 0), font=font)
        x += panel.width + gap
    draw.text((gap, height - bottom + 6), footer, fill=(0, 0, 0), font=font)
    return canvas


def _format_bytes(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _quality(images_4: Tensor, images_16: Tensor) -> tuple[float, float]:
    a, b = (images_4 + 1) / 2, (images_16 + 1) / 2
    return psnr(a, b).mean().item(), ssim(a, b).mean().item()


def _print_summary(rows: list[tuple[str, str, str]], out: Path, wall: float) -> None:
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'':<{width}}  {'16-bit':>14}  {'4-bit svdquant':>14}")
    for name, v16, v4 in rows:
        print(f"{name:<{width}}  {v16:>14}  {v4:>14}")
    print(f"\nwrote {out}  (total {wall:.0f} s)")


# ---------------------------------------------------------------------------------------------
# The embedded digit model


def _labels_from_prompt(prompt: str | None, per_class: int) -> list[int]:
    digits = list(range(10)) if prompt is None else [int(ch) for ch in prompt if ch.isdigit()]
    if not digits:
        raise CliError(f"the embedded model draws digits: --prompt must contain digits 0-9 (e.g. --prompt 042), got {prompt!r}")
    return [d for d in digits for _ in range(per_class)]


def _generate_embedded(args: argparse.Namespace, device: torch.device, options: dict[str, Any]) -> None:
    from .demo.model import DEMO_SKIP, classify, load_demo
    from .demo.pipeline import DigitPipeline, to_uint8

    wall = time.perf_counter()
    if args.per_class < 1:
        raise CliError(f"--per-class must be >= 1, got {args.per_class}")
    labels = _labels_from_prompt(args.prompt, args.per_class)
    steps = args.steps or (20 if device.type == "cuda" else 12)
    demo = load_demo(device, torch.bfloat16)
    guidance = demo.config["sampler"]["guidance_scale"]
    batch = len(labels)  # one batch: the compiled graph sees a single shape
    print(f"embedded digit DiT ({sum(p.numel() for p in demo.transformer.parameters()) / 1e6:.1f} M params), "
          f"{len(labels)} images, {steps} steps, guidance {guidance}, seed {args.seed}, on {device}")

    def sample(model: Callable[..., Any], desc: str, n_steps: int = steps, which: list[int] = labels) -> Tensor:
        return DigitPipeline(model, guidance, batch_size=batch)(which, steps=n_steps, seed=args.seed, desc=desc)

    sample(demo.transformer, "16-bit warm-up (1 step)", n_steps=1)  # first-call costs stay out of the timing, as for 4-bit
    run_16 = _timed(device, len(labels), lambda: sample(demo.transformer, "16-bit sampling"))
    if args.calibrate:
        from .calibration import calibrate

        calib_labels = [i % 10 for i in range(args.calibrate)]
        with calibrate(demo.transformer):
            DigitPipeline(demo.transformer, guidance, batch_size=batch)(calib_labels, steps=steps, seed=args.seed + 1, desc="calibrating")
    bytes_16, _ = _weight_bytes(demo.transformer)
    compiled = _compile_4bit(demo.transformer, {**options, "skip": DEMO_SKIP})
    start = time.perf_counter()
    sample(compiled, "4-bit: quantize + compile (1 step)", n_steps=1)  # same batch shape as the timed run
    setup = time.perf_counter() - start
    _, bytes_4 = _weight_bytes(demo.transformer)
    run_4 = _timed(device, len(labels), lambda: sample(compiled, "4-bit sampling"))

    truth = torch.tensor(labels)
    acc_16 = (classify(demo.classifier, run_16.images) == truth).float().mean().item()
    acc_4 = (classify(demo.classifier, run_4.images) == truth).float().mean().item()
    p, s = _quality(run_4.images, run_16.images)
    out = args.out
    label = f"4-bit W4A4 SVDQuant ({args.format}, rank {args.rank}{', calibrated' if args.calibrate else ''})"
    footer = f"rows: digits; same seeds. 4-bit vs 16-bit: PSNR {p:.1f} dB, SSIM {s:.3f}; classifier accuracy {acc_16:.0%} / {acc_4:.0%}"
    _side_by_side(to_uint8(run_16.images), to_uint8(run_4.images), args.per_class, ("16-bit (bf16)", label), footer, scale=3).save(out)
    _print_summary(
        [
            ("weight memory (transformer)", _format_bytes(bytes_16), _format_bytes(bytes_4)),
            ("time per image", f"{run_16.seconds_per_image * 1000:.0f} ms", f"{run_4.seconds_per_image * 1000:.0f} ms"),
            ("quantize + compile", "-", f"{setup:.1f} s"),
            ("classifier accuracy", f"{acc_16:.1%}", f"{acc_4:.1%}"),
            ("PSNR vs 16-bit", "-", f"{p:.2f} dB"),
            ("SSIM vs 16-bit", "-", f"{s:.4f}"),
        ],
        out,
        time.perf_counter() - wall,
    )


# ---------------------------------------------------------------------------------------------
# Any local diffusers pipeline


def _local_pipeline_folder(model: str) -> str:
    """The local folder of pipeline ``model`` (a path or a hub id already in the cache), or a CliError."""
    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, "model_index.json")):
            return model
        looked = f"the folder {os.path.abspath(model)} (it has no model_index.json)"
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            return snapshot_download(model, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached, or not a valid id: both mean "not available here"
            looked = f"no folder {os.path.abspath(model)}, and the Hugging Face cache {HF_HUB_CACHE} has no snapshot of it"
    raise CliError(
        f"no diffusers pipeline {model!r} available locally (looked in {looked}); pass --model a folder holding "
        f"model_index.json, or download it first (huggingface-cli download {model}); without --model the embedded digit model runs"
    )


def _load_pipeline(model: str, device: torch.device) -> Any:
    import warnings

    from diffusers import DiffusionPipeline

    folder = _local_pipeline_folder(model)
    with warnings.catch_warnings():
        # diffusers >= 0.36 renames torch_dtype to dtype and warns; older releases know only torch_dtype.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(desc="sampling", leave=False)
    return pipe.to(device)


def _generate_diffusers(args: argparse.Namespace, device: torch.device, options: dict[str, Any]) -> None:
    from .demo.pipeline import to_uint8

    wall = time.perf_counter()
    pipe = _load_pipeline(args.model, device)
    attr = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser = getattr(pipe, attr, None)
    if denoiser is None:
        raise CliError(f"{args.model!r} has neither a transformer nor a unet to quantize; pass a text-to-image diffusion pipeline")
    prompt = args.prompt or "a photo of a cat sitting on a windowsill"
    steps = args.steps or 28

    def sample(n_steps: int = steps) -> Tensor:
        generator = torch.Generator("cpu").manual_seed(args.seed)
        with torch.no_grad():
            images = pipe(prompt, num_inference_steps=n_steps, generator=generator, output_type="pt").images
        return images.float().cpu() * 2 - 1

    sample(1)  # warm-up: first-call costs stay out of the timing, as for 4-bit
    run_16 = _timed(device, 1, sample)
    if args.calibrate:
        from .calibration import calibrate

        with calibrate(denoiser):
            for i in range(args.calibrate):
                pipe(prompt, num_inference_steps=max(2, steps // 4), generator=torch.Generator("cpu").manual_seed(args.seed + 1 + i))
    bytes_16, _ = _weight_bytes(denoiser)
    setattr(pipe, attr, _compile_4bit(denoiser, options))
    start = time.perf_counter()
    sample(1)
    setup = time.perf_counter() - start
    _, bytes_4 = _weight_bytes(denoiser)
    run_4 = _timed(device, 1, sample)
    p, s = _quality(run_4.images, run_16.images)
    out = args.out
    footer = f"{args.model}: '{prompt[:60]}', seed {args.seed}. 4-bit vs 16-bit: PSNR {p:.1f} dB, SSIM {s:.3f}"
    _side_by_side(to_uint8(run_16.images), to_uint8(run_4.images), 1, ("16-bit (bf16)", f"4-bit W4A4 SVDQuant ({args.format}, rank {args.rank})"), footer, scale=1).save(out)
    _print_summary(
        [
            (f"weight memory ({attr})", _format_bytes(bytes_16), _format_bytes(bytes_4)),
            ("time per image", f"{run_16.seconds_per_image:.2f} s", f"{run_4.seconds_per_image:.2f} s"),
            ("quantize + compile", "-", f"{setup:.1f} s"),
            ("PSNR vs 16-bit", "-", f"{p:.2f} dB"),
            ("SSIM vs 16-bit", "-", f"{s:.4f}"),
        ],
        out,
        time.perf_counter() - wall,
    )


__all__ = ["main", "generate", "CliError"]
