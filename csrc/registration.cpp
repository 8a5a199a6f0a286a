// The op schemas of vsam_ext._C, shared by the CPU (cpu_ops.cpp) and CUDA (cuda_ops.cu)
// implementations. Reached from Python as torch.ops.vsam_ext.<op>; the semantics of every op
// are those of vsam_ext/ops/reference.py (the oracle the tests compare against).
//
// Conventions: every buffer is 1-D, contiguous, of one dtype (float, double, half, bfloat16)
// and on one device; maths in fp32 (fp64 for double buffers), without fused multiply-add;
// `scale` is a 0-d tensor in the maths dtype on the buffers' device; `alpha`/`beta` of
// segment_axpby hold one value per segment on the buffers' device, in the maths dtype. Results
// (sums, statistics) are in the maths dtype too: fp32, fp64 for double buffers. Ops that may
// return "no statistics" return an empty tensor instead.
//
// The *_list ops are the same ops over lists of tensors wherever they live (FSDP2 local shards,
// a base optimizer's state tensors), in place, with the same maths and bits, in one call: the
// flat op applied to each tensor viewed as 1-D over its numel. Segment ops: each tensor is one
// segment. Statistics: over the tensors of index >= stat_first (clamped to [0, len], as the flat
// ops clamp stat_start). Every list as long as the first, one dtype across all lists, each tensor
// contiguous (any shape) with as many elements as the first list's tensor of the same index;
// `scale` one value, `alpha`/`beta` one value per tensor, in the maths dtype. An empty list does
// nothing and returns what the flat op does for an empty buffer: zeros(0) (segment ops), the
// statistics (0, 0) in fp32 when asked for (restore with psf), else none. Kernels: cpu_ops.cpp,
// and cuda_ops.cu in a CUDA build; other backends get them from vsam_ext/ops/lists.py, which
// loops over the tensors with the flat ops.
// torch's dispatcher needs a tensor to choose a kernel: an op all of whose tensor arguments are
// empty lists is answered by the Python wrappers (vsam_ext/ops/extension.py).
#include <torch/library.h>

TORCH_LIBRARY(vsam_ext, m) {
  m.def("segment_sumsq(Tensor x, int[] bounds, Tensor? weight, float eta=0.0) -> Tensor");
  m.def("segment_gram(Tensor a, Tensor b, int[] bounds) -> Tensor");
  m.def("segment_axpby(Tensor(a!) y, Tensor x, Tensor alpha, Tensor beta, int[] bounds) -> Tensor");
  m.def("perturb(Tensor(a!) param, Tensor grad, Tensor scale, Tensor(b!) backup, bool adaptive, "
        "Tensor(c!)? grad_keep, float eta=0.0) -> ()");
  m.def("restore_psf_stats(Tensor(a!) param, Tensor backup, Tensor grad_sam, Tensor(b!)? psf, "
        "int stat_start) -> Tensor");
  m.def("reuse(Tensor(a!) grad, Tensor psf, float coeff, Tensor? scalars=None) -> ()");
  m.def("sgd_step(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor(c!)? psf, "
        "Tensor? backup, float coeff, int stat_start, float lr, float weight_decay, float momentum, "
        "float dampening, bool nesterov, bool maximize, bool first, Tensor? scalars=None) -> Tensor");
  // Not an op on data: the flat buffer's memory seen as a parameter with a storage of its own
  // (alias.cpp). It aliases `flat` without saying so in the schema: never traced or compiled.
  m.def("own_storage_alias(Tensor flat, int offset, int[] size, int[] stride) -> Tensor");
  m.def("adamw_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!)? psf, Tensor? backup, float coeff, int stat_start, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, int step, bool maximize, Tensor? scalars=None) -> Tensor");

  m.def("segment_sumsq_list(Tensor[] x, Tensor[]? weight, float eta=0.0) -> Tensor");
  m.def("segment_gram_list(Tensor[] a, Tensor[] b) -> Tensor");
  m.def("segment_axpby_list(Tensor(a!)[] y, Tensor[] x, Tensor alpha, Tensor beta) -> Tensor");
  m.def("perturb_list(Tensor(a!)[] param, Tensor[] grad, Tensor scale, Tensor(b!)[] backup, bool adaptive, "
        "Tensor(c!)[]? grad_keep, float eta=0.0) -> ()");
  m.def("restore_psf_stats_list(Tensor(a!)[] param, Tensor[] backup, Tensor[] grad_sam, Tensor(b!)[]? psf, "
        "int stat_first) -> Tensor");
  m.def("reuse_list(Tensor(a!)[] grad, Tensor[] psf, float coeff, Tensor? scalars=None) -> ()");
  m.def("sgd_step_list(Tensor(a!)[] param, Tensor[] grad, Tensor(b!)[]? momentum_buffer, Tensor(c!)[]? psf, "
        "Tensor[]? backup, float coeff, int stat_first, float lr, float weight_decay, float momentum, "
        "float dampening, bool nesterov, bool maximize, bool first, Tensor? scalars=None) -> Tensor");
  m.def("adamw_step_list(Tensor(a!)[] param, Tensor[] grad, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "Tensor(d!)[]? psf, Tensor[]? backup, float coeff, int stat_first, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, int step, bool maximize, Tensor? scalars=None) -> Tensor");
}

// A module init so that `import vsam_ext._C` loads the library (and with it the registrations
// above) without pybind11: the ops are reached through torch.ops, not through this module.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
