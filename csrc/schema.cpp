// The schemas of the compiled kernels and the Python module eoc_kernels._C (docs/DESIGN.md §3.3).
//
// One out-variant op per EOC op, defined once here; each device registers its kernel for the same name
// with TORCH_LIBRARY_IMPL(eoc, <key>, m): CPU in cpu_ops.cpp, CUDA in cuda_ops.cu (a build against a
// CUDA torch). Their arguments are those of the eoc:: functional ops (eoc_kernels/_library.py, which
// defines those ops, their fake and their backward, and calls these), then the output to write:
//   coef_values: a branch's (alpha, beta_1, gamma, beta_2, beta_3) as 5 floats (zero-padded; cached_block's
//     hold attention's 5 then MLP's 5), unless its coef tensor (float32 [P], P in {3, 4, 5}) is given;
//   prev, prev2, prev3: a branch's history C_1, C_2, C_3 (cache is C_0); beta_i needs C_{i-1} and C_i;
//   threshold_value: the token threshold, unless threshold_tensor (float32, one element) is given;
//   cached_segment: cache [G, S, 2, B, N, C] is a ring of G in 1..4 generations, C_j of entry (s, k) in
//     generation (generation[s, k] - j) mod G; coef [S, 2, P].
// The Python functional ops live in the same "eoc" namespace (torch.library fragments of it).

#include <torch/library.h>

#include <Python.h>

TORCH_LIBRARY(eoc, m) {
  m.def(
      "cached_branch_out(Tensor x, Tensor gate, Tensor cache, Tensor? prev, Tensor? prev2, Tensor? prev3, "
      "Tensor? delta, Tensor? trend, "
      "float[] coef_values, Tensor? coef_tensor, float threshold_value, Tensor? threshold_tensor, "
      "Tensor(a!) out) -> ()");
  m.def(
      "cached_block_out(Tensor x, Tensor gate_attn, Tensor gate_mlp, Tensor cache_attn, Tensor cache_mlp, "
      "Tensor? prev_attn, Tensor? prev_mlp, Tensor? prev2_attn, Tensor? prev2_mlp, Tensor? prev3_attn, "
      "Tensor? prev3_mlp, Tensor? delta_attn, Tensor? delta_mlp, Tensor? trend_attn, "
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
