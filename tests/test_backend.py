"""Backend selection (mmfast.backend): the MMFAST_BACKEND variable, use_backend as a call and as
a nested context manager, and select_kernel's rules: auto falls back to the reference where no
kernel can serve, a forced triton never does.

Kernel lookup is exercised through made-up op and module names (and a fake kernel module placed
in sys.modules), so these tests keep their meaning whichever real kernels exist."""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

import mmfast
from mmfast import backend as B
from mmfast.backend import current_backend, select_kernel, use_backend

FAKE_MODULE = "_test_fake_kernels"


@pytest.fixture(autouse=True)
def no_active_backend(monkeypatch):
    """Start every test with no use_backend in force and no MMFAST_BACKEND, restoring both."""
    saved = list(B._stack)
    B._stack.clear()
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    yield
    B._stack[:] = saved


@pytest.fixture
def runnable_device():
    """A device Triton can run on here: CUDA, or the CPU under TRITON_INTERPRET=1."""
    if not B.triton_installed():
        pytest.skip("Triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if B.triton_interpreting():
        return torch.device("cpu")
    pytest.skip("no GPU and TRITON_INTERPRET was not set before mmfast was imported")


@pytest.fixture
def fake_kernel_module(monkeypatch):
    """``mmfast.kernels._test_fake_kernels`` serving the op ``fake_op`` only."""
    name = f"mmfast.kernels.{FAKE_MODULE}"
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    module.fake_op_forward = lambda *args: "forward"
    module.fake_op_backward = lambda *args: "backward"
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_default_is_auto():
    assert current_backend() == "auto"


@pytest.mark.parametrize("name", ["auto", "triton", "reference"])
def test_environment_variable(monkeypatch, name):
    monkeypatch.setenv("MMFAST_BACKEND", name)
    assert current_backend() == name
    monkeypatch.setenv("MMFAST_BACKEND", f"  {name.upper()} ")
    assert current_backend() == name


def test_environment_variable_invalid(monkeypatch):
    monkeypatch.setenv("MMFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"MMFAST_BACKEND='fastest' is not one of"):
        current_backend()


def test_use_backend_overrides_environment(monkeypatch):
    monkeypatch.setenv("MMFAST_BACKEND", "triton")
    with use_backend("reference"):
        assert current_backend() == "reference"
    assert current_backend() == "triton"


def test_use_backend_as_a_call_sets_it_for_the_process():
    selection = mmfast.use_backend("reference")
    try:
        assert current_backend() == "reference"
        assert mmfast.current_backend() == "reference"
    finally:
        selection.__exit__(None, None, None)
    assert current_backend() == "auto"


def test_use_backend_nesting_restores():
    with use_backend("reference"):
        with use_backend("triton"):
            assert current_backend() == "triton"
            with use_backend("auto"):
                assert current_backend() == "auto"
            assert current_backend() == "triton"
        assert current_backend() == "reference"
    assert current_backend() == "auto"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(KeyError):
        with use_backend("reference"):
            raise KeyError("boom")
    assert current_backend() == "auto"


@pytest.mark.parametrize("bad", ["gpu", "Triton", "", "ref"])
def test_use_backend_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="unknown mmfast backend"):
        use_backend(bad)
    assert current_backend() == "auto"


def test_reference_never_selects_a_kernel(fake_kernel_module):
    with use_backend("reference"):
        assert select_kernel("fake_op", FAKE_MODULE, torch.device("cpu")) is None
        assert select_kernel("fake_op", FAKE_MODULE, torch.device("meta")) is None


def test_auto_picks_reference_when_no_kernel_exists(runnable_device, fake_kernel_module):
    with use_backend("auto"):
        assert select_kernel("no_such_op", "no_such_module", runnable_device) is None
        # the module exists but does not serve this op
        assert select_kernel("other_op", FAKE_MODULE, runnable_device) is None


def test_auto_picks_an_existing_kernel(runnable_device, fake_kernel_module):
    with use_backend("auto"):
        assert select_kernel("fake_op", FAKE_MODULE, runnable_device) is fake_kernel_module


def test_auto_falls_back_on_a_device_triton_cannot_run_on(fake_kernel_module):
    with use_backend("auto"):
        assert select_kernel("fake_op", FAKE_MODULE, torch.device("meta")) is None


def test_forced_triton_without_kernel_raises_naming_the_op(runnable_device, fake_kernel_module):
    with use_backend("triton"):
        with pytest.raises(NotImplementedError, match=r"mmfast\.ops\.no_such_op: no Triton kernel"):
            select_kernel("no_such_op", "no_such_module", runnable_device)
        with pytest.raises(NotImplementedError, match=r"mmfast\.ops\.other_op"):
            select_kernel("other_op", FAKE_MODULE, runnable_device)
        assert select_kernel("fake_op", FAKE_MODULE, runnable_device) is fake_kernel_module


def test_forced_triton_on_an_unsupported_device_raises(fake_kernel_module):
    with use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"mmfast\.ops\.fake_op: backend 'triton' was forced"):
            select_kernel("fake_op", FAKE_MODULE, torch.device("meta"))


def test_forced_triton_through_the_environment(monkeypatch, fake_kernel_module):
    monkeypatch.setenv("MMFAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="was forced"):
        select_kernel("fake_op", FAKE_MODULE, torch.device("meta"))


def test_ops_run_on_the_reference_backend_whatever_kernels_exist():
    x = torch.arange(6.0).reshape(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    with use_backend("reference"):
        assert mmfast.ops.subset_sum_pool(x, mask).tolist() == [[4.0, 6.0]]
