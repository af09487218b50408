"""save_quantized / load_quantized: round trip through a fresh process, and mismatches (issue 8)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from svdq_compile import load_quantized, save_quantized
from svdq_compile.quantized_weights import quantized_entries

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, width=128):
            super().__init__()
            self.inp = nn.Linear(64, width)
            self.norm = nn.LayerNorm(width)
            self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
            self.proj_out = nn.Linear(width, 64)  # skipped by default: stays 16-bit in the file

        def forward(self, x):
            h = self.norm(self.inp(x))
            for block in self.blocks:
                h = h + torch.nn.functional.gelu(block(h))
            return self.proj_out(h)
    """
)
exec(MODEL)  # defines Tiny here exactly as the subprocess defines it

OPTIONS = {"rank": 8, "cache_dir": ""}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = Tiny().eval()  # noqa: F821 (defined by exec above)
    x = torch.randn(3, 10, 64)
    compiled = torch.compile(model, backend="svdquant", options=OPTIONS)
    with torch.no_grad():
        out = compiled(x)
    path = save_quantized(compiled, folder / "tiny.safetensors")
    torch.save({"x": x, "out": out}, folder / "io.pt")
    return folder, path


def test_file_is_4bit_with_config_and_json(saved):
    folder, path = saved
    meta = json.loads((folder / "tiny.json").read_text())
    assert meta["config"]["rank"] == 8 and sorted(meta["quantized"]) == ["blocks.0.weight", "blocks.1.weight", "inp.weight"]
    tensors = load_file(str(path))
    assert tensors["blocks.0.weight:qweight"].dtype == torch.uint8 and tensors["blocks.0.weight:qweight"].shape == (128, 64)
    assert "blocks.0.weight" not in tensors and tensors["proj_out.weight"].shape == (64, 128)


def test_round_trip_in_a_fresh_process_gives_identical_outputs(saved):
    folder, path = saved
    script = MODEL + textwrap.dedent(
        f"""
        import svdq_compile
        io = torch.load({str(folder / 'io.pt')!r})
        with torch.device("meta"):
            model = Tiny().eval()  # no 16-bit weights anywhere
        svdq_compile.load_quantized(model, {str(path)!r}, device="cpu")
        compiled = torch.compile(model, backend="svdquant", options={{"checkpoint": {str(path)!r}, "cache_dir": ""}})
        with torch.no_grad():
            out = compiled(io["x"])
        assert torch.equal(out, io["out"]), (out - io["out"]).abs().max()
        print("IDENTICAL")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "IDENTICAL" in proc.stdout, proc.stderr[-3000:]


def _rewrite(path, dest, drop=None, reshape=None, version=None):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["svdq_compile"])
    if drop:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(drop)}
        meta["quantized"].pop(drop, None)
    if reshape:
        meta["quantized"][reshape] = [1, 1]
    if version:
        meta["format_version"] = version
    save_file(tensors, str(dest), metadata={"svdq_compile": json.dumps(meta)})
    return dest


def test_packed_weights_from_a_checkpoint_give_identical_outputs(saved):
    folder, path = saved
    io = torch.load(folder / "io.pt")
    model = Tiny().eval()  # noqa: F821 (defined by exec above)
    load_quantized(model, path, packed_weights=True)
    (entry,) = quantized_entries(model.blocks[0].weight).values()
    assert entry.weight_q.dtype == torch.uint8
    compiled = torch.compile(model, backend="svdquant", options={"checkpoint": str(path), "cache_dir": ""})
    with torch.no_grad():
        assert torch.equal(compiled(io["x"]), io["out"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(drop="blocks.1.weight"), "blocks.1.weight"),
        (dict(reshape="inp.weight"), "inp.weight"),
        (dict(version=99), "format version 99"),
    ],
)
def test_mismatched_checkpoint_names_the_problem(saved, tmp_path, edit, message):
    _, path = saved
    bad = _rewrite(path, tmp_path / "bad.safetensors", **edit)
    model = Tiny()  # noqa: F821
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_quantized(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded partially


def test_checkpoint_of_another_architecture_is_refused(saved):
    _, path = saved
    with pytest.raises(ValueError, match="lacks"):
        load_quantized(torch.nn.Sequential(torch.nn.Linear(64, 64)), path)


def test_a_graph_served_to_weights_of_another_layout_says_what_to_do(saved):
    """Dynamo does not guard on the operands the backend adds: a second model of the class, loaded
    packed and compiled with the same options, is served the graph made for 8-bit operands."""
    folder, path = saved
    io = torch.load(folder / "io.pt")
    options = {"checkpoint": str(path), "cache_dir": ""}
    torch._dynamo.reset()
    unpacked, packed = Tiny().eval(), Tiny().eval()  # noqa: F821
    load_quantized(unpacked, path)
    load_quantized(packed, path, packed_weights=True)
    with torch.no_grad():
        assert torch.equal(torch.compile(unpacked, backend="svdquant", options=options)(io["x"]), io["out"])
        with pytest.raises(RuntimeError, match="another layout.*torch._dynamo.reset"):
            torch.compile(packed, backend="svdquant", options=options)(io["x"])
        torch._dynamo.reset()  # what the message says
        assert torch.equal(torch.compile(packed, backend="svdquant", options=options)(io["x"]), io["out"])


def test_saving_an_unquantized_model_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="run it once"):
        save_quantized(Tiny(), tmp_path / "x.safetensors")  # noqa: F821


def test_int4_pow2_checkpoint_reloads_its_fp8_operands(tmp_path):
    """The file stores the 4-bit values and multipliers of any two-level format; loading an
    int4_pow2 checkpoint gives the fp8 operands back, and the same outputs."""
    torch.manual_seed(1)
    model = Tiny().eval()  # noqa: F821 (defined by exec above)
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(model, backend="svdquant", options=OPTIONS | {"format": "int4_pow2"})
    with torch.no_grad():
        out = compiled(x)
    path = save_quantized(compiled, tmp_path / "pow2.safetensors")
    fresh = Tiny().eval()  # noqa: F821
    load_quantized(fresh, path)
    (entry,) = quantized_entries(fresh.blocks[0].weight).values()
    assert entry.weight_q.dtype == torch.float8_e4m3fn
    reloaded = torch.compile(fresh, backend="svdquant", options={"checkpoint": str(path), "cache_dir": ""})
    with torch.no_grad():
        assert torch.equal(reloaded(x), out)
    # packed at load: the blocks' operands to 4 bits (exponent nibbles), inp's one-group rows kept fp8
    packed = Tiny().eval()  # noqa: F821
    load_quantized(packed, path, packed_weights=True)
    assert [e.weight_q.dtype for e in quantized_entries(packed.blocks[0].weight).values()] == [torch.uint8]
    assert [e.weight_q.dtype for e in quantized_entries(packed.inp.weight).values()] == [torch.float8_e4m3fn]
    torch._dynamo.reset()  # else Dynamo serves the graph made for fresh's 8-bit operands (it does not guard on the operands the backend adds)
    compiled_packed = torch.compile(packed, backend="svdquant", options={"checkpoint": str(path), "cache_dir": ""})
    with torch.no_grad():
        assert torch.equal(compiled_packed(x), out)
