// vsam_ext::own_storage_alias: a tensor over `flat`'s memory from element `offset`, with the given
// sizes and strides, but with a storage of its own (covering exactly its elements) that keeps
// `flat` alive. The parameters live in the optimizer's flat buffer, where the fused kernels need
// them, yet each has its own storage as an unflattened parameter has: torch.save of a module's
// state_dict writes only its parameters, and safetensors sees no shared storage.
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <cstdint>

namespace {

at::Tensor own_storage_alias(const at::Tensor& flat, int64_t offset, c10::IntArrayRef size,
                             c10::IntArrayRef stride) {
  TORCH_CHECK(flat.dim() == 1 && flat.is_contiguous(), "own_storage_alias: flat must be a 1-D contiguous buffer");
  TORCH_CHECK(size.size() == stride.size(), "own_storage_alias: size and stride differ in length");
  int64_t extent = 1;   // elements spanned: 1 + sum (size - 1) * stride
  for (size_t d = 0; d < size.size(); ++d) {
    TORCH_CHECK(size[d] >= 0 && stride[d] >= 0, "own_storage_alias: negative size or stride");
    if (size[d] == 0) extent = 0;
    if (extent > 0) extent += (size[d] - 1) * stride[d];
  }
  TORCH_CHECK(extent > 0, "own_storage_alias: an empty tensor has no memory to alias");
  TORCH_CHECK(offset >= 0 && offset + extent <= flat.numel(), "own_storage_alias: elements [", offset, ", ",
              offset + extent, ") are outside the buffer of ", flat.numel());
  void* data = static_cast<char*>(flat.data_ptr()) + offset * flat.element_size();
  at::Tensor keep_alive = flat;
  return at::from_blob(data, size, stride, [keep_alive](void*) {}, flat.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(vsam_ext, CompositeExplicitAutograd, m) {
  m.impl("own_storage_alias", &own_storage_alias);
}
