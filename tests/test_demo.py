"""The embedded demo model, quantized: quality against 16-bit, and the ``svdq-compile`` command.

CPU, small sample counts (the W4A4 op's CPU path is the slow reference). Samples are digit-major:
image i draws digit ``i // per_class``, seeded by (seed, i), so a subset of the images is
comparable one to one across configurations.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svdq_compile import SVDQuantConfig
from svdq_compile.demo.model import DEMO_SKIP, WEIGHTS_DIR, classify, load_demo
from svdq_compile.demo.pipeline import DigitPipeline, quantize_linears
from svdq_compile.metrics import psnr

PER_CLASS = 3
STEPS = 6
SEED = 1234
LABELS = [d for d in range(10) for _ in range(PER_CLASS)]
NAIVE_LABELS = LABELS[::PER_CLASS]  # one image per digit: the naive "int4" CPU path is 4x slower


@pytest.fixture(scope="module")
def demo():
    return load_demo("cpu", torch.bfloat16)


def _sample(demo, transformer, labels):
    return DigitPipeline(transformer, demo.config["sampler"]["guidance_scale"], batch_size=len(labels))(labels, steps=STEPS, seed=SEED, progress=False)


def _quantized(demo, config):
    transformer = copy.deepcopy(demo.transformer)
    with torch.no_grad():
        swapped = quantize_linears(transformer, config, progress=False)
    assert len(swapped) == 42  # 6 blocks x (adaLN + q, k, v, out + 2 MLP); embedders and output stay 16-bit
    return transformer


def _accuracy(demo, images, labels):
    return (classify(demo.classifier, images) == torch.tensor(labels)).float().mean().item()


def test_shipped_weights_fit_the_package_budget():
    sizes = {p.name: p.stat().st_size for p in WEIGHTS_DIR.iterdir()}
    assert {"transformer.safetensors", "classifier.safetensors", "config.json"} <= set(sizes)
    assert sum(sizes.values()) <= 12 * 2**20, sizes


def test_4bit_keeps_accuracy_and_svdquant_beats_naive_w4a4(demo):
    images_16 = _sample(demo, demo.transformer, LABELS)
    svdq = _sample(demo, _quantized(demo, SVDQuantConfig(skip=DEMO_SKIP)), LABELS)
    naive = _sample(demo, _quantized(demo, SVDQuantConfig(rank=0, alpha=0.0, beta=0.0, format="int4", skip=DEMO_SKIP)), NAIVE_LABELS)

    acc_16, acc_4 = _accuracy(demo, images_16, LABELS), _accuracy(demo, svdq, LABELS)
    assert acc_16 >= 0.9, f"16-bit samples should be readable digits, classifier agrees on {acc_16:.0%}"
    assert acc_4 >= acc_16 - 0.05, f"4-bit accuracy {acc_4:.1%} vs 16-bit {acc_16:.1%}"

    to01 = lambda x: (x + 1) / 2  # noqa: E731
    ref = to01(images_16[::PER_CLASS])
    psnr_svdq = psnr(to01(svdq[::PER_CLASS]), ref).mean().item()
    psnr_naive = psnr(to01(naive), ref).mean().item()
    assert psnr_svdq > psnr_naive + 1.0, f"SVDQuant {psnr_svdq:.2f} dB vs naive W4A4 {psnr_naive:.2f} dB"
    assert psnr_svdq < 100, "4-bit images identical to 16-bit: nothing was quantized"


def _cli(*args: str, env_cache: Path) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "SVDQ_CACHE_DIR": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "svdq_compile", "generate", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_generates_side_by_side_png_and_summary(tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    result = _cli("--per-class", "1", "--steps", "2", "--rank", "16", "--out", str(out), "--device", "cpu", env_cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("weight memory (transformer)", "time per image", "classifier accuracy", "PSNR vs 16-bit", "SSIM vs 16-bit"):
        assert line in result.stdout, result.stdout
    memory = next(line for line in result.stdout.splitlines() if line.startswith("weight memory")).split()
    assert float(memory[-2]) < float(memory[-4]), "4-bit weights should take less memory than 16-bit"
    image = Image.open(out)
    assert image.width > 2 * image.height / 10 * 1 and image.width > 2 * 32 * 3  # two panels of 10 rows x 1 column


def test_cli_missing_model_is_one_clear_line(tmp_path):
    result = _cli("--model", str(tmp_path / "no-such-model"), env_cache=tmp_path / "cache")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "no-such-model" in lines[0] and "--model" in lines[0] and "looked in" in lines[0]


def test_cli_bad_out_is_one_clear_line_before_any_work(tmp_path):
    result = _cli("--out", str(tmp_path / "grid"), "--device", "cpu", env_cache=tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"svdq-compile: --out '{tmp_path / 'grid'}': give a .png file (e.g. --out {tmp_path / 'grid.png'}) or an existing folder"]
    assert result.stdout == "" and not (tmp_path / "cache").exists()  # it stopped before loading or quantizing anything


def test_cli_out_takes_a_folder_or_a_png_in_a_new_folder(tmp_path):
    from svdq_compile.cli import DEFAULT_OUT, output_path

    assert output_path(str(tmp_path)) == tmp_path / DEFAULT_OUT
    assert output_path(str(tmp_path / "new" / "grid.PNG")) == tmp_path / "new" / "grid.PNG"
    assert (tmp_path / "new").is_dir()
