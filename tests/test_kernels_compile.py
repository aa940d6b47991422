"""Every Triton kernel compiles for sm_90 (H100 / H200) in the configurations the GPU launchers
choose, on a machine without a GPU: tests/_compile_sm90.py runs the public ops forward and
backward in a fresh interpreter (TRITON_INTERPRET unset, so the kernels are real JIT functions)
and compiles each launch through Triton's whole pipeline to a cubin with the bundled ptxas,
launching nothing. The interpreter tests check what the kernels compute; this checks that the
GPU compiler accepts them (3-D tiles, reshapes into tl.dot, float64 dots, ...)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
SCRIPT = Path(__file__).with_name("_compile_sm90.py")


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build has no bundled ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    # float16 shares bfloat16's code paths; three dtypes keep the run near two minutes here.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dtypes", "float32,bfloat16,float64"],
                          env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    compiled = re.search(r"compiled (\d+) kernel variants for sm_90; 0 case\(s\) failed", out)
    assert compiled and int(compiled.group(1)) >= 100, out[-3000:]
