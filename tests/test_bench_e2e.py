"""Helpers of benchmarks/bench_e2e.py that run without a GPU: how the profiled forward's kernels
are sorted into shares of GPU time and into the GPU's idle time before each kernel, and the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_e2e", Path(__file__).parents[1] / "benchmarks" / "bench_e2e.py")
bench_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_e2e)


def test_idle_before_counts_gaps_not_overlaps():
    # Microseconds, out of order: the first "c" runs inside a's span (no wait before it, and "b"
    # waits from a's end, not c's); the later kernels wait 3, 2 and 7 us.
    kernels = [(30.0, 31.0, "a"), (0.0, 10.0, "a"), (2.0, 4.0, "c"), (13.0, 20.0, "b"), (22.0, 23.0, "c")]
    idle_ms, waits = bench_e2e.idle_before(kernels, forwards=2)
    assert idle_ms == (3.0 + 2.0 + 7.0) / 2 / 1e3
    assert waits == [("a", 0.0035, 1), ("b", 0.0015, 0), ("c", 0.001, 1)]


def test_share_of_names():
    assert bench_e2e.share_of("_w4a4_gemv_kernel") == "W4A4 GEMM"
    assert bench_e2e.share_of("_unpack_weight_kernel") == "W4A4 GEMM"
    assert bench_e2e.share_of("_row_max_lowrank_kernel") == "activation quantize"
    assert bench_e2e.share_of("triton_red_fused_abs_amax_mul_3") == "activation quantize"
    assert bench_e2e.share_of("triton_poi_fused_add_mul_native_layer_norm_1") == "everything else"
    assert bench_e2e.share_of("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "other GEMMs"


def test_table_compares_each_timing_with_bf16_inductors_and_leaves_unmeasured_ones_blank():
    def row(name, ms, steps=None):
        timings = {"ms": ms, "weight_gib": 11.4, "peak_gib": 12.0, "first_call_s": 9.0}
        return {"config": name, 4096: timings | ({} if steps is None else {"steps_ms": steps})}

    lines = bench_e2e.table([row("bf16 inductor", 134.0, 130.0), row("svdquant", 100.0, 97.5), row("fp8 rowwise", 101.0)], 4096).splitlines()
    cells = [line.split(" | ") for line in lines[3:]]
    assert [c[2:4] for c in cells] == [["1.00x", "130.0 (1.00x)"], ["1.34x", "97.5 (1.33x)"], ["1.33x", "-"]]


def test_merged_runs_keep_each_configurations_last_measurement():
    """Across results files, a configuration's row comes from the last run that measured it: a later
    run in which it failed does not hide it, a later measurement replaces an earlier one, and the
    rows follow the benchmark's order of configurations."""
    first = {"rows": [{"config": "svdquant", "4096": {"ms": 98.0}}, {"config": "bf16 inductor", "4096": {"ms": 133.0}},
                      {"config": "svdquant packed", "error": "out of memory"}]}
    second = {"rows": [{"config": "svdquant", "error": "timed out"}, {"config": "bf16 inductor", "4096": {"ms": 131.0}}]}
    rows = bench_e2e.merged_rows([first, second])
    assert [row["config"] for row in rows] == ["bf16 inductor", "svdquant", "svdquant packed"]
    assert rows[0][4096]["ms"] == 131.0 and rows[1][4096]["ms"] == 98.0 and rows[2]["error"] == "out of memory"
