"""Every Triton kernel compiles for sm_90 (H100 / H200) in the configurations the GPU launchers
choose, on a machine without a GPU: tests/_compile_sm90.py runs the public ops forward and
backward in a fresh interpreter (TRITON_INTERPRET unset, so the kernels are real JIT functions)
and compiles each launch through Triton's whole pipeline to a cubin with the bundled ptxas,
launching nothing. The interpreter tests check what the kernels compute; this checks that the
GPU compiler accepts them (3-D tiles, reshapes into tl.dot, float64 dots, ...)."""
import re
from pathlib import Path

import pytest

from _jit_scripts import needs_ptxas, run_jit_script
from _occupancy import blocks_per_sm

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


@pytest.mark.parametrize("registers,shared,warps,blocks", [
    (255, 0, 4, 2),          # 8,160 registers a warp, rounded to 8,192: 2 blocks of 4 warps
    (168, 0, 4, 3),          # 5,376 a warp (a multiple of 256 already): 3 blocks
    (169, 0, 4, 2),          # 176 a thread once rounded up: 5,632 a warp, 22,528 a block
    (80, 0, 4, 6),
    (32, 0, 1, 32),          # 64 warps' worth of registers, but at most 32 blocks an SM
    (32, 0, 8, 8),           # at most 64 warps an SM
    (32, 100 * 1024, 4, 2),  # 228 KiB of shared memory, 1 KiB more a block
    (32, 228 * 1024, 4, 0),  # with the 1 KiB a block takes, it does not fit
])
def test_blocks_per_sm_follows_the_sm90_limits(registers, shared, warps, blocks):
    assert blocks_per_sm(registers, shared, warps) == blocks
