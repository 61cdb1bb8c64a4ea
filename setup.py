"""One install for both packages: ``eoc_kernels`` (the ops) and ``eoc_dit`` (the DiT integration).

The C++/CUDA extension ``eoc_kernels._C`` (sources in ``csrc/``) is optional: it is built only when
``EOC_BUILD_EXT=1`` is set and ``csrc/`` holds sources, so a plain install never needs a compiler.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _optional_extensions():
    if os.environ.get("EOC_BUILD_EXT", "0") != "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not sources and not cuda_sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_sources and os.environ.get("EOC_BUILD_CUDA", "1") == "1":
        ext = CUDAExtension("eoc_kernels._C", sources + cuda_sources)
    else:
        ext = CppExtension("eoc_kernels._C", sources)
    return [ext], {"build_ext": BuildExtension}


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
    extras_require={"dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "ninja", "triton", "setuptools>=70.1"]},
    entry_points={"console_scripts": ["eoc=eoc_dit.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
