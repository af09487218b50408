"""Quality of 4-bit variants of the embedded digit DiT against its 16-bit samples.

    python benchmarks/bench_quality.py [--per-class 10] [--steps 20] [--device cuda]

Rows: 16-bit (bf16), W4A16 round-to-nearest (int4 weights, one absmax/7 scale per group of 64,
activations 16-bit), naive W4A4 (no smoothing, no low-rank branch) and SVDQuant at rank 16/32/64,
without and with calibration (smoothing searched per layer on recorded activations), in each
format (int4_2level, int4_pow2 and the paper's int4). Columns: classifier accuracy on the samples,
and PSNR / SSIM of each variant's samples against the 16-bit samples at the same seeds. Every W4A4
row swaps the linears the ``svdquant`` backend quantizes for ``QuantizedLinear`` (same op, no
compile), so the table compares numerics, not compilers. Prints a Markdown table, one row as soon
as it is done.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import Tensor, nn

from svdq_compile import SVDQuantConfig, numerics
from svdq_compile.backend import skip_reason
from svdq_compile.calibration import calibrate
from svdq_compile.demo.model import DEMO_SKIP, classify, load_demo
from svdq_compile.demo.pipeline import DigitPipeline, quantize_linears
from svdq_compile.metrics import psnr, ssim


def w4a16_rtn(model: nn.Module, group_size: int = 64) -> nn.Module:
    """A copy of ``model`` whose backend-eligible linear weights are int4 round-to-nearest, dequantized.

    Same layers as the W4A4 rows; activations stay 16-bit, so this is weight-only 4-bit.
    """
    model = copy.deepcopy(model)
    config = SVDQuantConfig(skip=DEMO_SKIP, group_size=group_size)
    with torch.no_grad():
        for name, linear in model.named_modules():
            if isinstance(linear, nn.Linear) and skip_reason(name, linear.weight, config) is None:
                q, scale = numerics.quantize_int4_groups(linear.weight, group_size, linear.weight.dtype)
                deq = q.float().unflatten(-1, (-1, group_size)) * scale.float().unsqueeze(-1)
                linear.weight.copy_(deq.flatten(-2))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--per-class", type=int, default=10 if cuda else 3, help="samples per digit")
    parser.add_argument("--steps", type=int, default=20 if cuda else 10)
    parser.add_argument("--calib-per-class", type=int, default=2, help="calibration images per digit (other seeds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--formats", default="int4_2level,int4_pow2,int4")
    parser.add_argument("--ranks", default="16,32,64")
    args = parser.parse_args()

    demo = load_demo(args.device, torch.bfloat16)
    guidance = demo.config["sampler"]["guidance_scale"]
    labels = [d for d in range(10) for _ in range(args.per_class)]
    truth = torch.tensor(labels)

    def sample(model: nn.Module, which: list[int] = labels, seed: int = args.seed) -> Tensor:
        return DigitPipeline(model, guidance, batch_size=len(which))(which, steps=args.steps, seed=seed, progress=False)

    start = time.perf_counter()
    reference = sample(demo.transformer)
    reference_seconds = time.perf_counter() - start
    calib_labels = [d for d in range(10) for _ in range(args.calib_per_class)]
    with torch.no_grad(), calibrate(demo.transformer) as stats:
        sample(demo.transformer, calib_labels, seed=args.seed + 1)
    print(f"embedded digit DiT, {len(labels)} samples, {args.steps} steps, guidance {guidance}, seed {args.seed}, "
          f"device {args.device}, torch {torch.__version__}; calibration on {len(calib_labels)} other samples", file=sys.stderr)

    print("| variant | format | rank | calibrated | classifier acc. | PSNR vs 16-bit (dB) | SSIM vs 16-bit | quantize s | sample s |")
    print("|---|---|---|---|---|---|---|---|---|")

    def row(name: str, fmt: str, rank: str, calibrated: str, images: Tensor, quant_s: float, sample_s: float) -> None:
        acc = (classify(demo.classifier, images) == truth).float().mean().item()
        a, b = (images + 1) / 2, (reference + 1) / 2
        p = "-" if images is reference else f"{psnr(a, b).mean().item():.2f}"
        s = "-" if images is reference else f"{ssim(a, b).mean().item():.4f}"
        print(f"| {name} | {fmt} | {rank} | {calibrated} | {acc:.1%} | {p} | {s} | {quant_s:.1f} | {sample_s:.1f} |", flush=True)

    row("16-bit (bf16)", "-", "-", "-", reference, 0.0, reference_seconds)

    t0 = time.perf_counter()
    rtn = w4a16_rtn(demo.transformer)
    t1 = time.perf_counter()
    row("W4A16 RTN", "int4 g64", "-", "-", sample(rtn), t1 - t0, time.perf_counter() - t1)

    for fmt in args.formats.split(","):
        variants = [("naive W4A4", SVDQuantConfig(rank=0, alpha=0.0, beta=0.0, format=fmt, skip=DEMO_SKIP), None)]
        for rank in (int(r) for r in args.ranks.split(",")):
            variants.append(("SVDQuant", SVDQuantConfig(rank=rank, format=fmt, skip=DEMO_SKIP), None))
            variants.append(("SVDQuant", SVDQuantConfig(rank=rank, format=fmt, skip=DEMO_SKIP), stats))
        for name, config, layer_stats in variants:
            t0 = time.perf_counter()
            model = copy.deepcopy(demo.transformer)
            with torch.no_grad():
                quantize_linears(model, config, layer_stats, progress=False)
            t1 = time.perf_counter()
            images = sample(model)
            row(name, fmt, str(config.rank), "yes" if layer_stats else "no", images, t1 - t0, time.perf_counter() - t1)
            del model


if __name__ == "__main__":
    main()
