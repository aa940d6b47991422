"""The installed distribution: Triton sources ship as mmfast.kernels inside the mmfast package and
no top-level ``kernels`` module is installed (that name belongs to another project).

Runs in a subprocess whose working directory is an empty temporary folder, so nothing is imported
from the source tree; skipped unless mmfast is installed non-editable (as CI's `make install`
does)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

LOCATE = "import json, mmfast; print(json.dumps({'file': mmfast.__file__}))"

CHECK = textwrap.dedent("""
    import importlib, json, os, pkgutil
    import mmfast, mmfast.kernels
    package = os.path.dirname(os.path.abspath(mmfast.__file__))
    kernels = os.path.dirname(os.path.abspath(mmfast.kernels.__file__))
    modules = sorted(m.name for m in pkgutil.iter_modules(mmfast.kernels.__path__))
    for name in modules:
        importlib.import_module(f"mmfast.kernels.{name}")
    try:
        import kernels as stray
        top_level = getattr(stray, "__file__", repr(stray))
    except ModuleNotFoundError:
        top_level = None
    print(json.dumps({"package": package, "kernels": kernels, "modules": modules,
                      "top_level_kernels": top_level}))
""")


def run_isolated(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("outside_checkout")
    found = run_isolated(LOCATE, cwd)
    if found.returncode != 0:
        pytest.skip("mmfast is not installed in this interpreter (run `make install`, as CI does)")
    path = json.loads(found.stdout.strip().splitlines()[-1])["file"]
    parts = os.path.abspath(path).split(os.sep)
    if "site-packages" not in parts and "dist-packages" not in parts:
        pytest.skip(f"mmfast is imported from {path}, not from site-packages: an editable or "
                    "source-tree install, whose layout differs from the distributed one")
    return cwd


def test_kernels_ship_inside_the_installed_package(installed):
    result = run_isolated(CHECK, installed)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["kernels"] == os.path.join(info["package"], "kernels")
    assert info["top_level_kernels"] is None, f"a top-level kernels module is installed: {info}"


def test_the_installed_package_runs_an_op(installed):
    code = ("import torch, mmfast\n"
            "x = torch.arange(6.0).reshape(1, 3, 2)\n"
            "with mmfast.use_backend('reference'):\n"
            "    print(mmfast.ops.subset_sum_pool(x, torch.tensor([[True, False, True]])).tolist())\n")
    result = run_isolated(code, installed)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[[4.0, 6.0]]"
