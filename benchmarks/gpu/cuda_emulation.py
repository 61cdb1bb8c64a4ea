"""Runs the CUDA kernels of csrc/cuda_ops.cu on the CPU, one OS thread per CUDA thread, under test_cuda_ops.py.

    python benchmarks/gpu/cuda_emulation.py                  # build, then the emulable GPU tests (minutes)
    python benchmarks/gpu/cuda_emulation.py -k "segment and 1152"   # pytest arguments pass through

A development check for a machine without a GPU; not a test of the GPU (no CUDA compiler, memory model,
scheduling or timing is involved) and not part of CI. It takes the kernels' own source, csrc/cuda_ops.cu,
and compiles it as C++ for the CPU against a small shim of the CUDA features it uses (``blockIdx`` /
``threadIdx`` / ``blockDim`` per thread, ``__syncthreads`` as a barrier of the block's threads,
``__shfl_xor_sync`` through a barrier of the warp's 32 threads, ``__shared__`` as one static array per
kernel, the half / bfloat16 intrinsics as c10's round-to-nearest-even conversions, ``<<<grid, block>>>``
as one block after another, each run by blockDim.x · blockDim.y threads). The host code (argument checks,
the choice of vector or scalar path, the launch geometry) is compiled unchanged, except that x must be on
the CPU instead of CUDA and the ops register as ``eoc_emu::cached_*_out`` (schemas copied from
csrc/schema.cpp). Every edit is a pattern that must match, so a change of the source that the emulation
cannot follow fails here, naming the pattern.

Then tests/eoc_kernels/test_cuda_ops.py runs with ``EOC_CUDA_EMULATION=<the built library>``: its ops are
``torch.ops.eoc_emu`` on CPU tensors; the tests that need a real GPU (CUDA graphs, the profiler's kernel
names, device checks, the 4.3 GB buffer) skip. What this checks: the index arithmetic, the slot layout
and 128-bit packing, the row reductions and the double-buffered barrier, the judgment, every dtype,
coefficient and threshold form, the argument checks, against the eager reference on the CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST = os.path.join("tests", "eoc_kernels", "test_cuda_ops.py")

SHIM = r'''// CPU emulation of the CUDA features csrc/cuda_ops.cu uses (benchmarks/gpu/cuda_emulation.py).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __grid_constant__
#define __restrict__
#define __shared__ static
#define C10_CUDA_KERNEL_LAUNCH_CHECK()

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx(0, 0, 0), blockIdx(0, 0, 0), blockDim(1, 1, 1);
using cudaStream_t = void*;
struct uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
inline __half __ushort_as_half(uint16_t u) { return {u}; }
inline uint16_t __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }
inline __half __float2half_rn(float f) { return {c10::Half(f).x}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::BFloat16(f).x}; }

struct EmuWarp {
  std::barrier<> bar{32};
  float vals[32];
};
inline std::barrier<>* g_block_barrier = nullptr;
inline std::vector<std::unique_ptr<EmuWarp>>* g_warps = nullptr;
inline thread_local int t_warp = 0, t_lane = 0;

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  EmuWarp& w = *(*g_warps)[t_warp];
  w.vals[t_lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.vals[t_lane ^ offset];
  w.bar.arrive_and_wait();
  return r;
}

template <class P>
void emu_launch(void (*kernel)(P), dim3 grid, dim3 block, const P& p) {
  const int threads = static_cast<int>(block.x * block.y);
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> bar(threads);
    std::vector<std::unique_ptr<EmuWarp>> warps;
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<EmuWarp>());
    g_block_barrier = &bar;
    g_warps = &warps;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = dim3(t % block.x, t / block.x, 0);
        blockIdx = dim3(bx, 0, 0);
        blockDim = block;
        t_warp = t / 32;
        t_lane = t % 32;
        kernel(p);
      });
    }
    for (auto& thread : pool) thread.join();
  }
}
'''

# (pattern, replacement, expected count) applied to csrc/cuda_ops.cu, in order.
EDITS = [
    (r"#include <c10/cuda/\w+\.h>\n", "", 3),
    (r"#include <cuda_\w+\.h>\n", "", 3),
    (r"(cached_\w+_kernel<Ty, VECTORIZED, JUDGE, HISTORY>)<<<g\.grid, g\.block, 0, stream>>>\(p\)",
     r"emu_launch(&\1, g.grid, g.block, p)", 2),
    (r"const c10::cuda::CUDAGuard guard\(x\.device\(\)\);", "", 2),
    (r"= c10::cuda::getCurrentCUDAStream\(\)", "= nullptr", 2),
    (r"c10::DeviceType::CUDA\)", "c10::DeviceType::CPU)", 1),  # check_x_out: x on the CPU
]


def emulation_source():
    with open(os.path.join(REPO_ROOT, "csrc", "cuda_ops.cu")) as f:
        source = f.read()
    with open(os.path.join(REPO_ROOT, "csrc", "schema.cpp")) as f:
        schemas = re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\);', f.read())
    for pattern, replacement, count in EDITS:
        source, found = re.subn(pattern, replacement, source)
        if found != count:
            raise RuntimeError(f"csrc/cuda_ops.cu: {pattern!r} matched {found} times, the emulation expects {count}")
    start = source.find("TORCH_LIBRARY_IMPL(eoc, CUDA, m)")
    if start < 0 or not schemas:
        raise RuntimeError("no TORCH_LIBRARY_IMPL(eoc, CUDA, m) in csrc/cuda_ops.cu or no m.def in csrc/schema.cpp")
    names = [re.search(r'"(\w+)\(', schema).group(1) for schema in schemas]
    registration = "TORCH_LIBRARY(eoc_emu, m) {\n" + "".join(
        f"  m.def({schema}, &eoc_cuda::{name});\n" for schema, name in zip(schemas, names)) + "}\n"
    return '#include "cuda_emulation_shim.h"\n' + source[:start] + registration


def build(directory):
    """Compiles the emulation (CPU, -O1) into directory; the shared library's path."""
    from torch.utils import cpp_extension

    with open(os.path.join(directory, "cuda_emulation_shim.h"), "w") as f:
        f.write(SHIM)
    source = os.path.join(directory, "cuda_ops_emulated.cpp")
    with open(source, "w") as f:
        f.write(emulation_source())
    cpp_extension.load(name="eoc_emu", sources=[source], extra_cflags=["-O1", "-std=c++20", "-ffp-contract=off",
                                                                       "-pthread"],
                       extra_include_paths=[directory, os.path.join(REPO_ROOT, "csrc")],  # op_checks.h
                       extra_ldflags=["-pthread"], is_python_module=False,
                       build_directory=directory, verbose=False)
    return os.path.join(directory, "eoc_emu.so")


def main(argv):
    with tempfile.TemporaryDirectory(prefix="eoc-cuda-emulation-") as directory:
        print("building the emulation of csrc/cuda_ops.cu ...", flush=True)
        library = build(directory)
        env = os.environ | {"EOC_CUDA_EMULATION": library}
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST, *argv],
                              cwd=REPO_ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
