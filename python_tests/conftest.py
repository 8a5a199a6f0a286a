import os

import torch

# Without a GPU the Triton kernels are tested on CPU tensors through the interpreter; it must
# be switched on before any kernel is decorated, i.e. before vsam_ext is imported. With a GPU
# the compiled kernels run on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one intra-op thread is faster and steadier on a shared 2-core
# machine. Tests of the multi-threaded kernels set the count themselves.
torch.set_num_threads(1)
