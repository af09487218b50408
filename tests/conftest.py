import os

import torch

# Without a GPU, Triton kernels can only run in Triton's CPU interpreter. The choice is made when a
# kernel is decorated, so it must be in the environment before anything imports svdq_compile.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
