import os

import pytest
import torch

# Without a GPU, Triton kernels can only run in Triton's CPU interpreter. The choice is made when a
# kernel is decorated, so it must be in the environment before anything imports svdq_compile.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def inductor_in_process():
    """Inductor compiles in this process (on a 2-core machine faster than its worker pool); Dynamo's
    caches are cleared when the module's tests are done. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("inductor_in_process")``."""
    with torch._inductor.config.patch(compile_threads=1):
        yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_compile_summaries():
    """Tests find their compiles' summaries as the entries appended to ``recent_summaries`` since
    they started; that deque keeps the last 64 only, so once a process has compiled 64 graphs,
    nothing seems appended. Emptied before each test."""
    from svdq_compile import backend

    backend.recent_summaries.clear()


@pytest.fixture(autouse=True)
def _no_tuning_file(monkeypatch):
    """Each test starts with the GEMM tuner's picks kept in the process only: tests tune under made-up
    keys and timings, and a tuning folder left set by an earlier test's compile
    (``use_tuning_cache``) would hand them another test's pick."""
    from svdq_compile.kernels import w4a4_gemm

    monkeypatch.setattr(w4a4_gemm, "_tuning_folder", None)
