"""When ``GraphReplay``'s input buffers copy a tensor in (on CPU: the buffers are plain tensors).
The replays themselves are tested on a GPU, in ``test_cuda_graphs_gpu.py``."""

from __future__ import annotations

import torch

from svdq_compile.cuda_graphs import _InputBuffer


def test_an_input_buffer_copies_unless_it_holds_the_same_tensor_unchanged_within_a_chain():
    temb = torch.randn(8)
    buffer = _InputBuffer(temb)
    assert buffer.fill(temb, chained=False) and torch.equal(buffer.tensor, temb)
    assert not buffer.fill(temb, chained=True)
    assert buffer.fill(temb, chained=False)  # a chain's first block always copies
    assert buffer.fill(temb.clone(), chained=True)  # equal values, another tensor
    view = temb[:]
    assert buffer.fill(view, chained=False) and not buffer.fill(view, chained=True)
    temb.mul_(3)  # through the base: the view's version changes too
    assert buffer.fill(view, chained=True) and torch.equal(buffer.tensor, temb)


def test_inference_tensors_are_always_copied():
    with torch.inference_mode():
        temb = torch.randn(8)
    buffer = _InputBuffer(temb)
    assert buffer.fill(temb, chained=False) and buffer.fill(temb, chained=True)
    assert torch.equal(buffer.tensor, temb)
