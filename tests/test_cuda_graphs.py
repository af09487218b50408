"""When ``GraphReplay``'s input buffers copy a tensor in, and when a first call turns captures off (on
CPU: the buffers are plain tensors).
The replays themselves are tested on a GPU, in ``test_cuda_graphs_gpu.py``."""

from __future__ import annotations

import torch

from svdq_compile.cuda_graphs import GraphReplay, _InputBuffer


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


def test_a_first_call_that_writes_into_an_activation_turns_the_captures_off(caplog):
    """A call's activations are copied before a replay: a graph that writes one would write the
    copy. Writes into parameters are fine (read in place) and a graph that writes nothing keeps
    its captures."""
    weight = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    x = torch.randn(4)
    reads = GraphReplay(lambda x, w: [x * w])
    reads._first_call([x, weight], 0)
    scales_weight = GraphReplay(lambda x, w: [x * w.mul_(2)])
    scales_weight._first_call([x, weight], 0)
    assert reads.disabled is None and scales_weight.disabled is None
    writes = GraphReplay(lambda x, w: [x.mul_(2) * w])
    with caplog.at_level("WARNING", logger="svdq_compile"):
        writes._first_call([x, weight], 0)
    assert writes.disabled is not None and "writes into its input tensors" in caplog.text
