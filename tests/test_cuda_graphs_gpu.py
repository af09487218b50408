"""``GraphReplay`` on a CUDA GPU (skipped without CUDA): chained calls hand their outputs over in
place, outputs a caller keeps are never overwritten, and every replay returns what the plain call
returns for that call's inputs.

Run on the GPU machine: ``pytest tests/test_cuda_graphs_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdq_compile.cuda_graphs import GraphReplay

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BLOCKS = 4


def block(image: torch.Tensor, text: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for a compiled transformer block: two activations in, two out, returned in the
    other order (as FLUX's blocks return ``(text, image)`` and take ``image, text``)."""
    image = torch.tanh(image @ weight) + text.mean(1, keepdim=True)
    return text * 0.5 + image[:, : text.shape[1]], image


def weights() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(64, 64, generator=g).cuda() / 8, requires_grad=False) for _ in range(BLOCKS)]


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 64, generator=g).cuda(), torch.randn(32, 16, generator=g).cuda()


def forward(call, image: torch.Tensor, text: torch.Tensor, ws: list[nn.Parameter], keep: dict | None = None) -> torch.Tensor:
    """The blocks in a chain; ``keep`` collects block 1's outputs (a U-Net's skip connection)."""
    for i, w in enumerate(ws):
        text, image = call(image, text, w)
        if keep is not None and i == 1:
            keep["outputs"] = (text, image)
            keep["values"] = (text.clone(), image.clone())
    return torch.cat((text, image), 1)


def test_chained_calls_read_the_previous_outputs_in_place():
    """After one uncaptured forward, each block is captured once; every block after the first
    reads the previous block's output buffers in place (copies nothing), two output sets serve the
    whole chain, and every forward equals the plain calls on its own inputs."""
    ws = weights()
    replay = GraphReplay(block)
    with torch.no_grad():
        for seed in range(5):
            got = forward(lambda *a: replay(list(a)), *inputs(seed), ws)
            want = forward(block, *inputs(seed), ws)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, forward(block, *inputs(0), ws))  # inputs differ enough to tell
    captures = [c for cs in replay.captures.values() for c in cs]
    assert len(captures) == BLOCKS
    assert sorted(len(c.copied) for c in captures) == [0] * (BLOCKS - 1) + [2]
    (buffers,) = replay.buffers.values()
    assert len(buffers.output_sets) == 2


def test_outputs_a_caller_keeps_are_not_overwritten():
    """A caller that keeps block 1's outputs (or only a view of one) through later blocks and later
    forwards reads them unchanged: replays write other output sets while those are held, and the
    kept sets are used again once released."""
    ws = weights()
    replay = GraphReplay(block)
    call = lambda *a: replay(list(a))  # noqa: E731
    with torch.no_grad():
        for seed in range(3):
            forward(call, *inputs(seed), ws)
        first, second = {}, {}
        forward(call, *inputs(10), ws, keep=first)
        view_only = first["outputs"][1][5:]
        want_view = first["values"][1][5:]
        del first["outputs"]
        got = forward(call, *inputs(11), ws, keep=second)
        torch.testing.assert_close(got, forward(block, *inputs(11), ws), rtol=1e-5, atol=1e-5)
        assert torch.equal(view_only, want_view)
        assert all(torch.equal(a, b) for a, b in zip(second["outputs"], second["values"]))
        (buffers,) = replay.buffers.values()
        held_sets = len(buffers.output_sets)
        assert held_sets > 2
        del view_only, second
        captures = sum(map(len, replay.captures.values()))
        for seed in range(12, 14):
            torch.testing.assert_close(forward(call, *inputs(seed), ws), forward(block, *inputs(seed), ws), rtol=1e-5, atol=1e-5)
        assert sum(map(len, replay.captures.values())) == captures and len(buffers.output_sets) == held_sets
