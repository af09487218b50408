"""``GraphReplay`` on a CUDA GPU (skipped without CUDA): chained calls hand their outputs over in
place, a tensor every block is passed is copied once per chain, outputs a caller keeps are never
overwritten, a graph that writes into its inputs runs uncaptured, and every replay returns what the
plain call returns for that call's inputs; for graphs that return their outputs and for graphs that
write them into buffers they are passed (``write_outputs_into_buffers``).

Run on the GPU machine: ``pytest tests/test_cuda_graphs_gpu.py``.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from svdq_compile.cuda_graphs import BufferedOutputs, GraphReplay

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BLOCKS = 4


def block(image: torch.Tensor, text: torch.Tensor, shared: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for a compiled transformer block: two activations in, two out, returned in the
    other order (as FLUX's blocks return ``(text, image)`` and take ``image, text``), and ``shared``,
    the same tensor for every block (as FLUX's timestep embedding)."""
    image = torch.tanh(image @ weight) * shared + text.mean(1, keepdim=True)
    return text * 0.5 + image[:, : text.shape[1]], image


def block_into(image: torch.Tensor, text: torch.Tensor, shared: torch.Tensor, weight: torch.Tensor, *buffers: torch.Tensor) -> tuple[()]:
    """``block`` writing its outputs into the buffers it is passed, as a graph rewritten by
    ``write_outputs_into_buffers`` does: one buffer per output, or both side by side in one."""
    new_text, new_image = block(image, text, shared, weight)
    if len(buffers) == 2:
        buffers[0].copy_(new_text)
        buffers[1].copy_(new_image)
    else:
        torch.cat((new_text, new_image), 1, out=buffers[0])
    return ()


F32 = torch.float32
# How each contract's replay is made: the graph returns its outputs, or writes them into buffers,
# one each or one for both (the outputs are then views of it, as FLUX's single blocks' are).
REPLAYS = {
    "returns": lambda: GraphReplay(block),
    "writes into buffers": lambda: GraphReplay(block_into, BufferedOutputs(
        (((32, 16), (16, 1), F32), ((32, 64), (64, 1), F32)), ((0, (32, 16), (16, 1), 0), (1, (32, 64), (64, 1), 0)))),
    "writes views of one buffer": lambda: GraphReplay(block_into, BufferedOutputs(
        (((32, 80), (80, 1), F32),), ((0, (32, 16), (80, 1), 0), (0, (32, 64), (80, 1), 16)))),
}


def weights() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(64, 64, generator=g).cuda() / 8, requires_grad=False) for _ in range(BLOCKS)]


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 64, generator=g).cuda(), torch.randn(32, 16, generator=g).cuda(), torch.rand(64, generator=g).cuda() + 0.5


def forward(call, image: torch.Tensor, text: torch.Tensor, shared: torch.Tensor, ws: list[nn.Parameter], keep: dict | None = None,
            between=None) -> torch.Tensor:
    """The blocks in a chain; ``keep`` collects block 1's outputs (a U-Net's skip connection);
    ``between(i, shared)`` runs after block i."""
    for i, w in enumerate(ws):
        text, image = call(image, text, shared, w)
        if keep is not None and i == 1:
            keep["outputs"] = (text, image)
            keep["values"] = (text.clone(), image.clone())
        if between is not None:
            between(i, shared)
    return torch.cat((text, image), 1)


def captured(replay: GraphReplay, ws: list[nn.Parameter]) -> tuple[GraphReplay, Callable]:
    """``replay`` and a call of it as the blocks call it, after three forwards (uncaptured,
    captured, replayed)."""
    call = lambda *a: replay(list(a))  # noqa: E731
    with torch.no_grad():
        for seed in range(3):
            forward(call, *inputs(seed), ws)
    return replay, call


class CountCopies(TorchDispatchMode):
    """Counts the tensor copies made on the host's side (a graph replay dispatches none)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.ops.aten.copy_.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("contract", REPLAYS)
def test_chained_calls_read_the_previous_outputs_in_place(contract):
    """After one uncaptured forward, each block is captured once; every block after the first
    reads the previous block's output buffers in place (copies nothing), two output sets serve the
    whole chain (one more for the first block where its inputs have another layout), and every
    forward equals the plain calls on its own inputs."""
    ws = weights()
    replay = REPLAYS[contract]()
    with torch.no_grad():
        for seed in range(5):
            got = forward(lambda *a: replay(list(a)), *inputs(seed), ws)
            want = forward(block, *inputs(seed), ws)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, forward(block, *inputs(0), ws))  # inputs differ enough to tell
    captures = [c for cs in replay.captures.values() for c in cs]
    assert len(captures) == BLOCKS
    assert sorted(len(c.copied) for c in captures) == [1] * (BLOCKS - 1) + [3]
    # Views of one buffer are strided: the first block's inputs (contiguous) are another layout,
    # whose buffers hold the one output set that block writes.
    sets = [len(b.output_sets) for b in replay.buffers.values()]
    assert sets == ([1, 2] if contract == "writes views of one buffer" else [2])


@pytest.mark.parametrize("contract", REPLAYS)
def test_outputs_a_caller_keeps_are_not_overwritten(contract):
    """A caller that keeps block 1's outputs (or only a view of one) through later blocks and later
    forwards reads them unchanged: replays write other output sets while those are held, and the
    kept sets are used again once released."""
    ws = weights()
    replay, call = captured(REPLAYS[contract](), ws)
    with torch.no_grad():
        first, second = {}, {}
        forward(call, *inputs(10), ws, keep=first)
        view_only = first["outputs"][1][5:]
        want_view = first["values"][1][5:]
        del first["outputs"]
        got = forward(call, *inputs(11), ws, keep=second)
        torch.testing.assert_close(got, forward(block, *inputs(11), ws), rtol=1e-5, atol=1e-5)
        assert torch.equal(view_only, want_view)
        assert all(torch.equal(a, b) for a, b in zip(second["outputs"], second["values"]))
        buffers = list(replay.buffers.values())[-1]  # block 1's layout (the first block's comes first where they differ)
        held_sets = len(buffers.output_sets)
        assert held_sets > 2
        del view_only, second
        captures = sum(map(len, replay.captures.values()))
        for seed in range(12, 14):
            torch.testing.assert_close(forward(call, *inputs(seed), ws), forward(block, *inputs(seed), ws), rtol=1e-5, atol=1e-5)
        assert sum(map(len, replay.captures.values())) == captures and len(buffers.output_sets) == held_sets


def test_a_tensor_every_block_is_passed_is_copied_once_per_chain():
    """Blocks after the first skip copying the tensor they share with it while it is unchanged; a
    change in place (between forwards or between two blocks) or another tensor is copied again, so
    every forward still equals the plain calls."""
    ws = weights()
    _, call = captured(GraphReplay(block), ws)
    with torch.no_grad():
        image, text, shared = inputs(5)
        with CountCopies() as counted:
            got = forward(call, image, text, shared, ws)
        torch.testing.assert_close(got, forward(block, image, text, shared, ws), rtol=1e-5, atol=1e-5)
        assert counted.copies == 3  # the first block's three inputs; the others read the shared one's copy

        for change_shared in (lambda: shared.mul_(1.5), lambda: shared.data.mul_(1.5)):  # between forwards; the second keeps the version
            change_shared()
            torch.testing.assert_close(forward(call, image, text, shared, ws), forward(block, image, text, shared, ws), rtol=1e-5, atol=1e-5)

        def change(i: int, s: torch.Tensor) -> None:
            if i == 1:
                s.add_(0.25)

        got = forward(call, image, text, shared.clone(), ws, between=change)
        torch.testing.assert_close(got, forward(block, image, text, shared.clone(), ws, between=change), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, forward(block, image, text, shared, ws))  # the change shows
        torch.testing.assert_close(forward(call, image, text, shared + 0, ws), forward(block, image, text, shared, ws), rtol=1e-5, atol=1e-5)


def test_a_graph_that_writes_into_its_inputs_runs_uncaptured(caplog):
    """A replay would write the input buffer, not the caller's tensor: such a graph is found at its
    first call and runs uncaptured, with the caller seeing every write."""

    def scaling_block(image, text, shared, weight):
        text.mul_(0.5)
        return block(image, text, shared, weight)

    ws = weights()
    replay = GraphReplay(scaling_block)
    with torch.no_grad(), caplog.at_level("WARNING", logger="svdq_compile"):
        for seed in range(3):
            image, text, shared = inputs(seed)
            got = forward(lambda *a: replay(list(a)), image, text, shared, ws)
            image2, text2, shared2 = inputs(seed)
            want = forward(scaling_block, image2, text2, shared2, ws)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(text, text2)  # the first block's write reached the caller's tensor
    assert not replay.captures
    assert "writes into its input tensors" in caplog.text


def test_a_call_replays_only_a_capture_of_its_own_weights_operand_shapes_and_device():
    """The capture key: the same weights and operands replay one capture; an operand of another
    shape (a LoRA of another rank, even at a reused address), a weight on the CPU, or autograd
    tracking a weight makes the call run otherwise, and every call returns the plain call's result."""

    def low_rank_block(x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> list[torch.Tensor]:
        return [x @ weight.to(x.device) + (x @ down.T) @ up.T]

    g = torch.Generator().manual_seed(3)
    weight = nn.Parameter(torch.randn(64, 64, generator=g).cuda() / 8, requires_grad=False)
    x = torch.randn(32, 64, generator=g).cuda()
    replay = GraphReplay(low_rank_block)

    def check(down: torch.Tensor, up: torch.Tensor, w: torch.Tensor = weight, calls: int = 3) -> None:
        for _ in range(calls):
            torch.testing.assert_close(replay([x, w, down, up], 2)[0], low_rank_block(x, w, down, up)[0], rtol=1e-5, atol=1e-5)

    rank8 = (torch.randn(8, 64, generator=g).cuda(), torch.randn(64, 8, generator=g).cuda())
    with torch.no_grad():
        check(*rank8)
        assert sum(map(len, replay.captures.values())) == 1
        # rank 4, its down projection the first rows of rank 8's: the same address, another shape
        check(rank8[0][:4], rank8[1][:, :4].contiguous())
        assert sum(map(len, replay.captures.values())) == 2
        on_cpu = nn.Parameter(weight.cpu(), requires_grad=False)
        check(*rank8, w=on_cpu)
    assert sum(map(len, replay.captures.values())) == 2  # the CPU weight's calls ran uncaptured
    tracked = nn.Parameter(weight.clone())
    out = replay([x, tracked, *rank8], 2)[0]
    assert out.grad_fn is not None  # autograd saw the call: it ran uncaptured
    assert sum(map(len, replay.captures.values())) == 2
