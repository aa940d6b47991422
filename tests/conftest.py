"""Test configuration: Triton's interpreter on CPU-only machines, the ``cuda`` marker, and
backend fixtures.

``TRITON_INTERPRET`` is read when kernels are decorated, so it is set here, before anything
imports mmfast, whenever no GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite is many tiny ops: one intra-op thread avoids OpenMP spin-waiting, which made small
# steps up to 60x slower on a loaded 2-core machine.
torch.set_num_threads(1)

import mmfast  # noqa: E402  (must come after TRITON_INTERPRET is set)
from mmfast.backend import select_kernel  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def require_backend(name: str, op: str, kernel_module: str, device=DEVICE) -> None:
    """Skip the calling test when ``name`` is 'triton' and op has no kernel yet
    (``kernel_module`` as named in the op's ``mmfast/ops`` file)."""
    if name != "triton":
        return
    with mmfast.use_backend("triton"):
        try:
            select_kernel(op, kernel_module, torch.device(device))
        except NotImplementedError:
            pytest.skip(f"no Triton kernel for {op} yet")


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Run a test under each backend; use with :func:`require_backend` for triton."""
    with mmfast.use_backend(request.param):
        yield request.param


@pytest.fixture
def reference_backend():
    with mmfast.use_backend("reference"):
        yield "reference"
