import os

# The Triton kernels are tested on CPU tensors through the interpreter; it must be switched on
# before any kernel is decorated, i.e. before vsam_ext is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
