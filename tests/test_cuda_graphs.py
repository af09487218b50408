"""What ``GraphReplay`` keys a call by, when its input buffers copy a tensor in, when a first call
turns captures off, and which graphs write their outputs into buffers passed in (on CPU: the
buffers are plain tensors). The replays themselves are tested on a GPU, in
``test_cuda_graphs_gpu.py``."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from svdq_compile.cuda_graphs import GraphReplay, _InputBuffer, _plan, write_outputs_into_buffers


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
    reads._first_call([x, weight], _plan([x, weight], 0))
    scales_weight = GraphReplay(lambda x, w: [x * w.mul_(2)])
    scales_weight._first_call([x, weight], _plan([x, weight], 0))
    assert reads.disabled is None and scales_weight.disabled is None
    writes = GraphReplay(lambda x, w: [x.mul_(2) * w])
    with caplog.at_level("WARNING", logger="svdq_compile"):
        writes._first_call([x, weight], _plan([x, weight], 0))
    assert writes.disabled is not None and "writes into its input tensors" in caplog.text


def dynamo_graph(fn, *args, dynamic: bool = False) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """The FX graph Dynamo makes of ``fn`` (with its example values), compiled nowhere, and its
    inputs in the graph's order (Dynamo's, not ``fn``'s)."""
    graphs = []
    with torch.no_grad():
        torch.compile(fn, backend=lambda gm, example_inputs: graphs.append((gm, list(example_inputs))) or gm, dynamic=dynamic)(*args)
    torch._dynamo.reset()
    return graphs[0]


def test_a_graph_writes_its_new_outputs_into_buffers_passed_after_its_inputs():
    """One buffer per tensor the outputs are or view: a transpose is a view of the product's buffer."""
    x, y = torch.randn(4, 6), torch.randn(6, 3)
    gm, inputs = dynamo_graph(lambda x, y: (torch.tanh(x) * 2, (x @ y).t()), x, y)
    buffered = write_outputs_into_buffers(gm)
    assert buffered.buffers == (((4, 6), (6, 1), torch.float32), ((4, 3), (3, 1), torch.float32))
    assert buffered.views == ((0, (4, 6), (6, 1), 0), (1, (3, 4), (1, 3), 0))
    buffers = buffered.allocate(torch.device("cpu"))
    assert gm(*inputs, *buffers) == ()
    outputs = buffered.outputs(buffers)
    torch.testing.assert_close(outputs[0], torch.tanh(x) * 2)
    torch.testing.assert_close(outputs[1], (x @ y).t())
    # The replay's uncaptured path makes the buffers and returns the views.
    torch.testing.assert_close(GraphReplay(gm, buffered)(inputs)[1], (x @ y).t())


def split_rows(r, x):
    """As FLUX's single blocks end: the text and image rows of one tensor."""
    h = r + torch.tanh(x) * 2
    return h[:, :5], h[:, 5:]


def test_outputs_that_split_one_tensor_share_its_buffer_and_inductor_writes_them_there():
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code

    r, x = torch.randn(1, 12, 16), torch.randn(1, 12, 16)
    gm, inputs = dynamo_graph(split_rows, r, x)
    buffered = write_outputs_into_buffers(gm)
    assert buffered.buffers == (((1, 12, 16), (192, 16, 1), torch.float32),)
    assert buffered.views == ((0, (1, 5, 16), (192, 16, 1), 0), (0, (1, 7, 16), (192, 16, 1), 80))
    buffers = buffered.allocate(torch.device("cpu"))
    with torch.no_grad():
        _, (code,) = run_and_get_code(lambda: compile_fx(gm, [*inputs, *buffers])(*inputs, *buffers))
    for got, want in zip(buffered.outputs(buffers), split_rows(r, x)):
        torch.testing.assert_close(got, want)
    assert "return ()" in code


def view_of_an_input(x):
    return x + 1, x.view(-1)


def overlapping_views_of_one_tensor(x):
    y = x * 2
    return y, y[1:]


def part_of_a_tensor(x):
    return ((x * 2)[:, :1],)


@pytest.mark.parametrize("fn", [view_of_an_input, overlapping_views_of_one_tensor, part_of_a_tensor])
def test_other_outputs_stay_the_graphs_own(fn):
    gm, _ = dynamo_graph(fn, torch.randn(4, 4))
    code = gm.code
    assert write_outputs_into_buffers(gm) is None
    assert gm.code == code


def test_symbolic_output_shapes_stay_the_graphs_own():
    gm, _ = dynamo_graph(lambda x: (x * 2,), torch.randn(5, 4), dynamic=True)
    assert write_outputs_into_buffers(gm) is None


def test_the_capture_key_names_the_weights_operand_shapes_and_activation_layouts(monkeypatch):
    """``GraphReplay._key`` on CPU tensors posing as CUDA ones: calls with the same weights,
    operands and activation layouts share a key; another weight, an operand of another shape at the
    same address (a LoRA of another rank), another activation layout or another scalar make
    another one; autograd tracking a weight, or an argument a capture could freeze, gives none."""
    from svdq_compile import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "_IS_CUDA", lambda t: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    replay = GraphReplay(lambda *args: None)
    weight = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    other_weight = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    down = torch.randn(4, 8)
    x = torch.randn(3, 8)

    def key(*args):
        return replay._key(list(args), static_extra=1)

    with torch.no_grad():
        base = key(x, weight, 0.5, down)
        assert base.full == key(torch.randn(3, 8), weight, 0.5, down).full  # new activation values, same layout
        assert len(replay.plans) == 1
        for changed in (key(x, other_weight, 0.5, down), key(x, weight, 0.5, down[:2]), key(torch.randn(5, 8), weight, 0.5, down),
                        key(x.t().contiguous().t(), weight, 0.5, down), key(x, weight, 0.25, down)):
            assert changed.full != base.full
        assert key(x, weight, 1, down).plan is not base.plan  # an int where a float was: another plan
        assert key(x, weight, [0.5], down) is None
    tracked = torch.nn.Parameter(torch.randn(8, 8))
    assert key(x, tracked, 0.5, down) is None
    with torch.no_grad():
        assert key(x, tracked, 0.5, down) is not None  # autograd off: nothing tracks it
