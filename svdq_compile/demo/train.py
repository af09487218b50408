"""Train the demo's digit transformer and digit classifier from scratch, seeded, in minutes on one GPU.

    python -m svdq_compile.demo.train --out svdq_compile/demo/weights

Both models learn from digits rendered by ``digits.make_dataset``. The transformer learns rectified
flow (velocity ``noise - image``) with 10% label dropout to the null class, so samples can use
classifier-free guidance; its EMA weights ship in bf16. At the end the shipped files are reloaded,
sampled in bf16 and scored by the classifier at a few guidance scales; the best scale is written
into config.json as the sampler default, and a grid of samples is saved as samples.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from .digits import make_dataset
from .model import NULL_CLASS, NUM_CLASSES, TRANSFORMER_CONFIG, DigitClassifier, build_transformer, classify, load_demo
from .pipeline import TIMESTEP_SCALE, DigitPipeline, to_uint8


def _to_unit(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1.0


def train_classifier(images: Tensor, labels: Tensor, steps: int, batch: int, seed: int, device: torch.device) -> DigitClassifier:
    """Adam on random batches of the given uint8 images (already on ``device``)."""
    torch.manual_seed(seed)
    model = DigitClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator(device).manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), device=device, generator=gen)
        loss = F.cross_entropy(model(_to_unit(images[idx])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"classifier step {step} loss {loss.item():.4f}", flush=True)
    return model.eval()


def train_transformer(images: Tensor, labels: Tensor, args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rectified-flow training with bf16 autocast; returns the EMA model and a log summary."""
    torch.manual_seed(args.seed)
    model = build_transformer(TRANSFORMER_CONFIG).to(device)
    # eval(): diffusers' LabelEmbedding drops labels on its own in train mode, independently in each
    # block; we drop them here instead, once per sample, consistently across blocks.
    model.eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    print(f"transformer parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(args.seed)
    start = time.time()
    losses: list[float] = []
    step = 0
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (args.batch,), device=device, generator=gen)
        x0 = _to_unit(images[idx])
        y = labels[idx].clone()
        y[torch.rand(args.batch, device=device, generator=gen) < args.label_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.sigmoid(torch.randn(args.batch, device=device, generator=gen))  # logit-normal: more weight mid-path
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            v = model(xt, timestep=t * TIMESTEP_SCALE, class_labels=y).sample
        loss = F.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        if step % 50 == 0:  # .item() syncs the GPU: read the loss only now and then
            losses.append(loss.item())
        if step % 500 == 0 or step == args.steps - 1:
            print(f"transformer step {step} loss {loss.item():.4f} lr {lr:.2e} elapsed {time.time() - start:.0f}s", flush=True)
        if time.time() - start > args.max_minutes * 60:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    summary = {"steps_done": step + 1, "seconds": round(time.time() - start, 1), "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4)}
    return ema, summary


def _grid(images: Tensor, columns: int) -> Tensor:
    rows = images.shape[0] // columns
    g = to_uint8(images[: rows * columns])[:, 0]
    return g.view(rows, columns, *g.shape[1:]).permute(0, 2, 1, 3).reshape(rows * g.shape[1], columns * g.shape[2])


def evaluate(out: Path, device: torch.device, per_class: int, steps: int, seed: int, scales: list[float]) -> dict:
    """Reload the shipped files, sample in bf16 at each guidance scale, score with the classifier."""
    from PIL import Image

    demo = load_demo(device, torch.bfloat16, out)
    labels = [d for d in range(NUM_CLASSES) for _ in range(per_class)]
    results = {}
    best = None
    for scale in scales:
        images = DigitPipeline(demo.transformer, guidance_scale=scale, batch_size=1000)(labels, steps=steps, seed=seed, progress=False)
        acc = (classify(demo.classifier, images) == torch.tensor(labels)).float().mean().item()
        results[str(scale)] = round(acc, 4)
        print(f"bf16 samples, guidance {scale}, {steps} steps: classifier agrees on {acc:.1%}", flush=True)
        if best is None or acc > best[0]:
            best = (acc, scale, images)
    acc, scale, images = best
    # One row per digit, the first 10 samples of each.
    grid = _grid(images.view(NUM_CLASSES, per_class, 1, 32, 32)[:, :10].reshape(-1, 1, 32, 32), 10)
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.Resampling.NEAREST).save(out / "samples.png")
    return {"accuracy_by_guidance": results, "best_guidance": scale, "best_accuracy": round(acc, 4), "steps": steps, "per_class": per_class}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for transformer/classifier safetensors, config.json, samples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=200_000, help="rendered training digits for the transformer")
    parser.add_argument("--steps", type=int, default=12_000, help="transformer optimizer steps")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--max-minutes", type=float, default=5.0, help="stop transformer training early after this long")
    parser.add_argument("--classifier-images", type=int, default=60_000)
    parser.add_argument("--classifier-steps", type=int, default=3000)
    parser.add_argument("--eval-per-class", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8, help="processes rendering digits")
    args = parser.parse_args(argv)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, labels = make_dataset(args.images, args.seed, args.workers)
    cls_images, cls_labels = make_dataset(args.classifier_images, args.seed + 1, args.workers)
    test_images, test_labels = make_dataset(10_000 if device.type == "cuda" else 1000, args.seed + 2, args.workers)
    print(f"rendered {len(images) + len(cls_images) + len(test_images)} digits in {time.time() - t0:.1f}s on {device}", flush=True)

    classifier = train_classifier(cls_images.to(device), cls_labels.to(device), args.classifier_steps, 256, args.seed, device)
    classifier = classifier.to(torch.bfloat16).float()  # score with the weights as shipped
    test_acc = (classify(classifier, _to_unit(test_images)) == test_labels).float().mean().item()
    print(f"classifier accuracy on held-out rendered digits: {test_acc:.2%}", flush=True)

    ema, summary = train_transformer(images.to(device), labels.to(device), args, device)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in ema.state_dict().items()}, args.out / "transformer.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in classifier.state_dict().items()}, args.out / "classifier.safetensors")
    config = {
        "transformer": TRANSFORMER_CONFIG,
        "sampler": {"steps": args.eval_steps, "guidance_scale": 2.0},
        "classifier": {"heldout_accuracy": round(test_acc, 4)},
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"} | summary,
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=1))
    evaluation = evaluate(args.out, device, args.eval_per_class, args.eval_steps, args.seed + 3, [1.0, 1.5, 2.0, 3.0, 4.0])
    config["sampler"]["guidance_scale"] = evaluation["best_guidance"]
    config["evaluation_bf16"] = evaluation
    (args.out / "config.json").write_text(json.dumps(config, indent=1))
    print(json.dumps(config["evaluation_bf16"]), flush=True)
    print(f"total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
