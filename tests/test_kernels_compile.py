"""Every Triton kernel compiles for sm_90 (H100 / H200) in the configurations the GPU launchers
choose, on a machine without a GPU: tests/_compile_sm90.py runs the public ops forward and
backward in a fresh interpreter (TRITON_INTERPRET unset, so the kernels are real JIT functions)
and compiles each launch through Triton's whole pipeline to a cubin with the bundled ptxas,
launching nothing. The interpreter tests check what the kernels compute; this checks that the
GPU compiler accepts them (3-D tiles, reshapes into tl.dot, float64 dots, ...)."""
import re
from pathlib import Path

from _jit_scripts import needs_ptxas, run_jit_script

SCRIPT = Path(__file__).with_name("_compile_sm90.py")


@needs_ptxas
def test_every_kernel_compiles_for_sm90():
    # float16 shares bfloat16's code paths; three dtypes keep the run near two minutes here.
    # Triton's default FMA contraction set off: mmfast's launches must still compile every
    # kernel with it (kernels/_launch.py, COMPILE_OPTIONS).
    proc = run_jit_script(SCRIPT, "--dtypes", "float32,bfloat16,float64", timeout=1200,
                          env={"TRITON_DEFAULT_FP_FUSION": "0"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    compiled = re.search(r"compiled (\d+) kernel variants for sm_90; 0 case\(s\) failed", out)
    assert compiled and int(compiled.group(1)) >= 100, out[-3000:]
    fused = re.search(r"fp fusion enabled in (\d+) of (\d+) kernel variants", out)
    assert fused and fused.group(1) == fused.group(2) == compiled.group(1), out[-3000:]
