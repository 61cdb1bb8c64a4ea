"""Backend selection: names, availability, $EOC_BACKEND, and registering a new backend."""

import re

import pytest
import torch

import eoc_kernels
from eoc_kernels import available_backends, cached_branch, dispatch, resolve_backend

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_env_backend(monkeypatch):
    monkeypatch.delenv("EOC_BACKEND", raising=False)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the backend registry without the real "cpp" backend (eoc_kernels.cpp), so a
    test may register fake "cpp" implementations freely."""
    monkeypatch.setattr(dispatch, "_REGISTRY",
                        {op: {name: impl for name, impl in impls.items() if name != "cpp"}
                         for op, impls in dispatch._REGISTRY.items()})
    return dispatch._REGISTRY


def branch_inputs():
    x = torch.randn(2, 3, 4)
    return x, torch.randn(2, 4), torch.randn(2, 3, 4)


def triton_on_cpu():
    """Whether the triton backend is registered and runs on CPU (TRITON_INTERPRET=1, conftest)."""
    backend = getattr(eoc_kernels, "triton", None)
    return backend is not None and backend.is_available(CPU)


CPP = eoc_kernels.cpp_available()  # the C++ kernels, eoc_kernels._C (tests/eoc_kernels/test_cpp_ops.py)
#: The real backends on CPU, and the ones the fake registrations below see (no real "cpp" there).
CPU_BACKENDS = (["triton"] if triton_on_cpu() else []) + (["cpp"] if CPP else []) + ["torch"]
NON_CPP_CPU_BACKENDS = [name for name in CPU_BACKENDS if name != "cpp"]
AUTO_ON_CPU = "cpp" if CPP else "torch"


def test_auto_on_cpu_picks_cpp_when_built_else_torch():
    # The Triton interpreter runs on CPU (tests) but is never "auto"'s pick.
    auto = AUTO_ON_CPU
    assert available_backends(CPU) == CPU_BACKENDS
    assert available_backends("cpu", "cached_segment") == CPU_BACKENDS
    assert available_backends(torch.device("meta")) == ["torch"]
    assert resolve_backend(None, CPU) == auto
    assert resolve_backend("auto", CPU) == auto
    assert resolve_backend("auto", CPU, "cached_block") == auto
    assert resolve_backend("torch", CPU) == "torch"


@pytest.mark.skipif(not triton_on_cpu(), reason="needs triton and TRITON_INTERPRET=1")
def test_triton_backend_runs_on_cpu_under_the_interpreter(monkeypatch):
    assert resolve_backend("triton", CPU) == "triton"
    assert resolve_backend("triton", "cpu", "cached_segment") == "triton"
    x, gate, cache = branch_inputs()
    expected = cached_branch(x, gate, cache, backend="torch")
    torch.testing.assert_close(cached_branch(x, gate, cache, backend="triton"), expected)
    monkeypatch.setenv("EOC_BACKEND", "triton")
    torch.testing.assert_close(cached_branch(x, gate, cache), expected)
    with pytest.raises(ValueError, match="'triton' .*not available for device meta"):
        resolve_backend("triton", torch.device("meta"))


def test_auto_skips_backends_not_eligible_for_auto(registry):
    dispatch.register_backend("cached_branch", "cpp", lambda *a, **k: None,
                              lambda device: True, auto_eligible=lambda device: False)
    assert available_backends(CPU, "cached_branch")[-2:] == ["cpp", "torch"]
    assert resolve_backend("auto", CPU, "cached_branch") == "torch"
    assert resolve_backend("cpp", CPU, "cached_branch") == "cpp"


@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("auto", AUTO_ON_CPU),
                                             (" Torch ", "torch"), ("", AUTO_ON_CPU)])
def test_env_var_is_read(monkeypatch, value, expected):
    monkeypatch.setenv("EOC_BACKEND", value)
    assert resolve_backend(None, CPU) == expected


def test_backend_names_are_the_implemented_ones():
    # No reserved names without an implementation behind them: a compiled backend adds its name
    # together with its module, which registers it for every op ("cpp" / "cuda": eoc_kernels.cpp /
    # eoc_kernels.cuda, usable when eoc_kernels._C holds their kernels).
    assert dispatch.BACKENDS == ("triton", "cuda", "cpp", "torch")
    for op in ("cached_branch", "cached_block", "cached_segment"):
        assert set(dispatch._REGISTRY[op]) == set(dispatch.BACKENDS), op


def test_unknown_backend_lists_valid_names(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'.*: auto, triton, cuda, cpp, torch$"):
        resolve_backend("tpu", CPU)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        cached_branch(*branch_inputs(), backend="tpu")
    monkeypatch.setenv("EOC_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu' \\(from EOC_BACKEND\\)"):
        cached_branch(*branch_inputs())


@pytest.mark.parametrize("name", ["rocm", "metal"])
def test_unimplemented_backend_names_are_unknown(monkeypatch, name):
    with pytest.raises(ValueError, match=rf"unknown backend '{name}'"):
        resolve_backend(name, CPU)
    with pytest.raises(ValueError, match=rf"unknown backend '{name}'"):
        cached_branch(*branch_inputs(), backend=name)
    monkeypatch.setenv("EOC_BACKEND", name)
    with pytest.raises(ValueError, match=rf"unknown backend '{name}' \(from EOC_BACKEND\)"):
        cached_branch(*branch_inputs())
    with pytest.raises(ValueError, match="cannot register backend"):
        dispatch.register_backend("cached_branch", name, lambda *a, **k: None, lambda d: True)


def test_cuda_backend_on_cpu_tensors_says_why():
    """"cuda" names the CUDA C++ kernels: on CPU tensors it is refused with its reason (the build lacks
    them, or the tensors are not on a GPU), never run."""
    reason = eoc_kernels.cuda.unavailable_reason(CPU)
    assert reason
    with pytest.raises(ValueError, match=r"backend 'cuda' .*not available for device cpu; available: .*: "
                                         + re.escape(reason)):
        cached_branch(*branch_inputs(), backend="cuda")


def test_backend_not_available_on_device(registry):
    dispatch.register_backend("cached_branch", "cpp", lambda *a, **k: None,
                              lambda device: device.type == "cuda")
    pattern = (rf"backend 'cpp' .*not available for device cpu; available: "
               rf"{', '.join(NON_CPP_CPU_BACKENDS)}")
    with pytest.raises(ValueError, match=pattern):
        resolve_backend("cpp", CPU, "cached_branch")
    with pytest.raises(ValueError, match=pattern):
        cached_branch(*branch_inputs(), backend="cpp")


def test_backend_argument_overrides_env(monkeypatch):
    monkeypatch.setenv("EOC_BACKEND", "triton")
    assert resolve_backend("torch", CPU) == "torch"
    assert resolve_backend("auto", CPU) == AUTO_ON_CPU
    monkeypatch.setenv("EOC_BACKEND", "no-such-backend")
    out = cached_branch(*branch_inputs(), backend="torch")
    assert out.shape == (2, 3, 4)


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend must be a str"):
        resolve_backend(1, CPU)


def test_registered_backend_is_picked_and_dispatched(registry, monkeypatch):
    calls = []

    def fake_branch(x, gate, cache, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(x)

    dispatch.register_backend("cached_branch", "cpp", fake_branch,
                              lambda device: device.type == "cpu")
    # cpp implements cached_branch only: "auto" prefers it there, not for every op.
    assert available_backends(CPU, "cached_branch") == NON_CPP_CPU_BACKENDS[:-1] + ["cpp", "torch"]
    assert available_backends(CPU) == NON_CPP_CPU_BACKENDS
    assert resolve_backend("auto", CPU, "cached_branch") == "cpp"
    assert available_backends(torch.device("meta"), "cached_branch") == ["torch"]

    x, gate, cache = branch_inputs()
    assert torch.equal(cached_branch(x, gate, cache, token_threshold=0.5),
                       torch.zeros_like(x))
    assert calls and calls[0]["token_threshold"] == 0.5
    monkeypatch.setenv("EOC_BACKEND", "torch")
    assert not torch.equal(cached_branch(x, gate, cache), torch.zeros_like(x))
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["auto", "tpu"])
def test_register_rejects_non_backend_names(registry, name):
    with pytest.raises(ValueError, match="cannot register backend"):
        dispatch.register_backend("cached_branch", name, lambda *a, **k: None, lambda d: True)


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'cached_nothing'"):
        dispatch.get_impl("cached_nothing", None, CPU)


def test_unavailable_backend_names_its_reason(registry):
    dispatch.register_backend("cached_branch", "cpp", lambda *a, **k: None, lambda device: False,
                              unavailable_reason=lambda device: f"no kernels for {device} here")
    with pytest.raises(ValueError, match=r"backend 'cpp' .*not available for device cpu; available: .*: "
                                         r"no kernels for cpu here$"):
        resolve_backend("cpp", CPU, "cached_branch")
    with pytest.raises(TypeError, match="register_backend: unavailable_reason must be callable"):
        dispatch.register_backend("cached_branch", "cpp", lambda *a, **k: None, lambda device: False,
                                  unavailable_reason="not built")
