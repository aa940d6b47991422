"""Thread blocks an SM can hold, from a kernel's registers, shared memory and warps: the limits
of the CUDA occupancy calculator for compute capability 9.0 (H100, H200), so that a static
report (``tests/_compile_sm90.py --report``) can say what a register count costs without a GPU.

Limits per SM on sm_90: 65,536 registers, allocated to a warp in units of 256 (so a thread's
count is rounded up to a multiple of 8); 228 KiB of shared memory, of which each block also
takes 1 KiB for the system; 64 warps; 32 blocks.
"""
from __future__ import annotations

REGISTERS = 65536
REGISTER_UNIT = 256          # registers allocated to a warp at a time
SHARED = 228 * 1024
SHARED_RESERVED = 1024       # per block
MAX_WARPS = 64
MAX_BLOCKS = 32


def blocks_per_sm(registers: int, shared: int, warps: int) -> int:
    """Resident blocks of ``warps`` warps whose threads take ``registers`` registers each and
    which use ``shared`` bytes of shared memory (0 when a block does not fit an SM)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS // max(1, per_warp * warps)
    by_shared = SHARED // (shared + SHARED_RESERVED)
    return min(by_registers, by_shared, MAX_WARPS // warps, MAX_BLOCKS)
