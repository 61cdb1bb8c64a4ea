// The schemas of the compiled kernels and the Python module eoc_kernels._C (docs/DESIGN.md §3.3).
//
// One out-variant op per EOC op, defined once here; each device registers its kernel for the same name
// with TORCH_LIBRARY_IMPL(eoc, <key>, m): CPU in cpu_ops.cpp, CUDA in cuda_ops.cu (a build against a
// CUDA torch). Their arguments are those of the eoc:: functional ops (eoc_kernels/_library.py, which
// defines those ops, their fake and their backward, and calls these), then the output to write:
//   coef_values: (alpha, beta, gamma) as floats, unless coef_tensor (float32 [3]) is given;
//   threshold_value: the token threshold, unless threshold_tensor (float32, one element) is given;
//   cached_block's coef_values hold attention's triple then MLP's; cached_segment's coef is [S, 2, 3].
// The Python functional ops live in the same "eoc" namespace (torch.library fragments of it).

#include <torch/library.h>

#include <Python.h>

TORCH_LIBRARY(eoc, m) {
  m.def(
      "cached_branch_out(Tensor x, Tensor gate, Tensor cache, Tensor? prev, Tensor? delta, Tensor? trend, "
      "float[] coef_values, Tensor? coef_tensor, float threshold_value, Tensor? threshold_tensor, "
      "Tensor(a!) out) -> ()");
  m.def(
      "cached_block_out(Tensor x, Tensor gate_attn, Tensor gate_mlp, Tensor cache_attn, Tensor cache_mlp, "
      "Tensor? prev_attn, Tensor? prev_mlp, Tensor? delta_attn, Tensor? delta_mlp, Tensor? trend_attn, "
      "Tensor? trend_mlp, float[] coef_values, Tensor? coef_tensor_attn, Tensor? coef_tensor_mlp, "
      "float threshold_value, Tensor? threshold_tensor, Tensor(a!) out) -> ()");
  m.def(
      "cached_segment_out(Tensor x, Tensor gates, Tensor cache, Tensor generation, Tensor? delta, Tensor? trend, "
      "Tensor? coef, float threshold_value, Tensor? threshold_tensor, Tensor(a!) out) -> ()");
}

// `import eoc_kernels._C` loads this library, which registers the ops above; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "EOC kernels: the eoc::cached_*_out ops (torch.ops.eoc), CPU and, if built, CUDA", -1,
                               nullptr};
  return PyModule_Create(&module);
}
