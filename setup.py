"""One install for both packages: ``eoc_kernels`` (the ops) and ``eoc_dit`` (the DiT integration).

The C++ extension ``eoc_kernels._C`` (the "cpp" backend's CPU kernels, sources in ``csrc/``) is built
by default with torch's ``BuildExtension`` (ninja when installed). It needs torch importable at build
time: pip's isolated build environment gets the pinned torch of ``pyproject.toml``'s ``[build-system]``
(``pip install -r requirements.txt``, README), or build with ``--no-build-isolation`` against the
installed torch (a GPU machine's own).

The extension stays optional: where torch is not importable at build time, no C++
compiler exists or the build fails, the install goes on with a one-line warning and the ops run on the
eager reference. ``EOC_BUILD_EXT=0`` skips the extension; ``EOC_BUILD_EXT=1`` makes any of those a build
error instead. CUDA sources (``csrc/*.cu``) are added when torch has CUDA and
``EOC_BUILD_CUDA`` is not 0.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "eoc_kernels._C"
# nvcc options of csrc/*.cu (besides torch's own: -std=c++20, --expt-relaxed-constexpr, the no-implicit-half
# macros, the arch flags of TORCH_CUDA_ARCH_LIST or the visible GPU). --fmad=false: no fused multiply-adds, as
# -ffp-contract=off for the C++ kernels, so every product is rounded as in the eager reference; no
# --use_fast_math (IEEE sqrt and division). benchmarks/gpu/nvcc_compile.py reads this list.
NVCC_FLAGS = ["-O3", "--fmad=false"]


def _warn(reason: str) -> None:
    print(f"WARNING: {EXT_NAME} not built ({reason}); the ops use the eager reference", file=sys.stderr)


def _ext_mode() -> str:
    """"0": skip the extension, "1": require it, "auto" (default): build it when possible."""
    mode = os.environ.get("EOC_BUILD_EXT", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"EOC_BUILD_EXT must be 0, 1 or auto, got {mode!r}")
    return mode


def _optional_extensions():
    mode = _ext_mode()
    if mode == "0":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not sources and not cuda_sources:
        return [], {}

    def skip(reason):
        if mode == "1":
            raise SystemExit(f"EOC_BUILD_EXT=1 but {EXT_NAME} cannot be built: {reason}")
        _warn(reason)
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        return skip(f"torch is not importable at build time: {error}; install torch first and build with "
                    f"pip's --no-build-isolation")
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler.split()[0]) is None:
        return skip(f"no C++ compiler: {compiler!r} not found")

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failure, unless EOC_BUILD_EXT=1, leaves a working pure-Python install."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # a compiler or ninja failure: the reference still works
                if mode == "1":
                    raise
                _warn(f"the build failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                self.extensions = []  # nothing to copy into the source tree (editable) or the wheel

    # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds (and a serial loop without it); the
    # module's libgomp.so.1 resolves to the copy torch has already loaded. -ffp-contract=off: no fused
    # multiply-adds, so every product and sum is rounded as in the eager reference and the kernels
    # match it bit for bit wherever no token sits on the judgment threshold (csrc/README.md).
    compile_args = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"]}
    link_args = ["-fopenmp"]
    if cuda_sources and torch.version.cuda and os.environ.get("EOC_BUILD_CUDA", "1") != "0":
        ext = CUDAExtension(EXT_NAME, sources + cuda_sources, extra_compile_args=compile_args | {"nvcc": NVCC_FLAGS},
                            extra_link_args=link_args)
    else:
        ext = CppExtension(EXT_NAME, sources, extra_compile_args=compile_args, extra_link_args=link_args)
    ext.depends = sorted(glob.glob(os.path.join("csrc", "*.h")))
    return [ext], {"build_ext": OptionalBuildExtension}


def _readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = _optional_extensions()

setup(
    name="eoc-kernels",
    version="0.1.0",
    description="Error-Optimized Cache (EOC) for Diffusion Transformers: fused kernels and DiT integration",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Every subpackage (eoc_dit.testbed included), so that a wheel or a plain `pip install .` works.
    packages=find_packages(include=["eoc_kernels", "eoc_kernels.*"])
    + find_packages("python", include=["eoc_dit", "eoc_dit.*"]),
    package_dir={"eoc_kernels": "eoc_kernels", "eoc_dit": "python/eoc_dit"},
    # The shipped testbed: model, prior, classifier, feature statistics and their cards (`eoc demo`,
    # `--model testbed`). Package data lands in both the wheel and the sdist.
    package_data={"eoc_dit.testbed": ["assets/*.pt", "assets/*.safetensors", "assets/*.json"]},
    include_package_data=False,
    zip_safe=False,
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    # setuptools >= 70.1 builds wheels without the `wheel` package: tests/test_wheel.py builds one
    # with --no-build-isolation (a fresh Python 3.11 venv starts with setuptools 65).
    # diffusers (and transformers, for PixArtAlphaPipeline) require no torch, so the pinned torch stays.
    extras_require={"dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "ninja", "triton", "setuptools>=70.1",
                            "diffusers>=0.42.1,<0.43", "transformers>=5.24,<6"],
                    "diffusers": ["diffusers>=0.42.1,<0.43", "transformers>=5.24,<6"]},
    entry_points={"console_scripts": ["eoc=eoc_dit.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
