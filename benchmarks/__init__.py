"""Benchmarks of eoc-kernels: pytest-benchmark suites (``pytest benchmarks``), the GPU check script
(``benchmarks/gpu/run_gpu_checks.py``) and their shared helpers (``_common``). See README.md here."""
