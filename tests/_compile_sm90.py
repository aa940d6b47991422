"""Compile every mmfast Triton kernel for a GPU target (sm_90: H100/H200) on a machine without
one, the way the GPU launchers configure them, and report what ptxas made of each.

Run as a script in a fresh interpreter (``TRITON_INTERPRET`` unset, so ``@triton.jit`` gives
real JIT functions):

    python tests/_compile_sm90.py [--arch 90] [--report]

A fake Triton driver reports the target; launches become ``warmup`` calls, which run the whole
compiler (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin through the bundled ptxas) and launch
nothing. mmfast's backend is told the triton path can run on CPU tensors, so the public ops'
forward and backward reach the launchers with the GPU block-size heuristics (the interpreter's
are not used). Output values are never read: this checks that the kernels compile, not what
they compute (the interpreter tests do that). Exit status 1 lists the cases that failed.
``--report`` adds each kernel variant's registers, spill stores and shared memory (cuobjdump).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from _occupancy import blocks_per_sm  # noqa: E402

try:
    import mmfast  # noqa: F401,E402  (the installed package, when there is one)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # else the source tree


class _TargetOnlyDriver:
    """Just enough of a Triton driver to compile for ``target``: device 0, stream 0."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def target_only(arch: int = 90) -> None:
    """Compile for ``sm_<arch>`` on this machine: Triton gets the target-only driver, and
    mmfast's backend is told the triton path can run on CPU tensors, so the public ops reach
    the GPU launchers (with the GPU block-size heuristics)."""
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    import mmfast.backend
    mmfast.backend.triton_can_run = lambda device: True


def record_launches(record) -> None:
    """Launch compiled kernels into ``record``: a kernel's launcher, instead of calling the
    CUDA driver, passes ``record`` the tuple of arguments Triton's launch path gave it."""
    def init_handles(self):
        if self.module is None:
            self.module, self.function = object(), id(self)
            self._run = lambda *call: record(call)
    CompiledKernel._init_handles = init_handles


COMPILED: dict[int, tuple[str, object]] = {}


def _compile_only(self, grid):
    def launch(*args, **kwargs):
        kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
        COMPILED[id(kernel)] = (self.__name__, kernel)
    return launch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def _cases(dtypes=tuple(DTYPES.values())):
    """(name, thunk) pairs: each thunk runs an op forward and backward on CPU tensors."""
    from mmfast import ops
    from mmfast.subsets import all_subsets

    def leaf(*shape, dtype):
        return torch.randn(shape, dtype=torch.float32).to(dtype).requires_grad_(True)

    def backward(*outs):
        outs = [o for o in outs if o is not None and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def bank(B, M):
        b = all_subsets(M)
        return b.expand(B, *b.shape)

    def per_sample(B, M):
        return torch.rand(B, M) < 0.5

    cases = []
    for dtype in dtypes:
        t = str(dtype).removeprefix("torch.")
        # Pool only: M = 4 and 16 read one and four membership words a row; M = 1, D = 1 makes
        # the smallest tiles. M = 8, D = 512 with the bank gives the tiles issue 4's bank
        # targets run (tiles do not depend on B).
        for M, D, masks, poe in ((8, 512, "per-sample", True), (8, 512, "bank", True),
                                 (8, 64, "bank", True),
                                 (64, 4096, "per-sample", True), (3, 17, "bank", True),
                                 (4, 40, "bank", False), (16, 96, "per-sample", False),
                                 (1, 1, "per-sample", False)):
            def pool(M=M, D=D, masks=masks, dtype=dtype, poe=poe):
                mask = bank(4, M) if masks == "bank" else per_sample(4, M)
                x = leaf(4, M, D, dtype=dtype)
                backward(ops.subset_sum_pool(x, mask))
                if not poe:
                    return
                mu, logvar = leaf(4, M, D, dtype=dtype), leaf(4, M, D, dtype=dtype)
                for prior in (True, False, (leaf(D, dtype=dtype), leaf(D, dtype=dtype))):
                    backward(*ops.gaussian_poe(mu, logvar, mask, prior=prior))
            cases.append((f"{'pool+poe' if poe else 'pool'} {t} M={M} D={D} {masks}", pool))

        def pool_linear(dtype=dtype):
            for mask in (bank(4, 8), per_sample(4, 8)):
                g, w, b = leaf(4, 8, 64, dtype=dtype), leaf(32, 64, dtype=dtype), leaf(32, dtype=dtype)
                backward(ops.subset_pool_linear(g, mask, w, b))
        cases.append((f"pool_linear {t}", pool_linear))

        for M, E, H, masks in ((8, 256, 4, "bank"), (8, 512, 8, "per-sample"), (3, 48, 3, "bank"),
                               (64, 512, 4, "per-sample"), (5, 256, 2, "per-sample")):
            def attention(M=M, E=E, H=H, masks=masks, dtype=dtype):
                mask = bank(2, M) if masks == "bank" else per_sample(2, M)
                q, k, v = (leaf(2, M, E, dtype=dtype) for _ in range(3))
                backward(ops.subset_attention(q, k, v, mask, num_heads=H))
            cases.append((f"attention {t} M={M} E={E} H={H} {masks}", attention))

        # S = 255 at d = 32 is wider than one tile of the full backward (its two-phase path).
        for d, K, C, S in ((20, 1, 0, 3), (64, 64, 0, 3), (20, 4, 10, 3), (64, 2, 64, 3),
                           (32, 2, 0, 255)):
            def terms(d=d, K=K, C=C, S=S, dtype=dtype):
                prior = None if C == 0 else (leaf(C, dtype=dtype), leaf(C, d, dtype=dtype),
                                              leaf(C, d, dtype=dtype))
                for stl in (True, False):
                    mu_s, lv_s = leaf(4, S, d, dtype=dtype), leaf(4, S, d, dtype=dtype)
                    mu_f, lv_f = leaf(4, d, dtype=dtype), leaf(4, d, dtype=dtype)
                    out = ops.gaussian_terms((mu_s, lv_s), leaf(K, 4, S, d, dtype=dtype),
                                             (mu_f, lv_f), leaf(K, 4, d, dtype=dtype),
                                             prior=prior, stl=stl)
                    backward(*out)
                    z = leaf(K, 4, d, dtype=dtype)
                    backward(ops.gaussian_log_prob(z, leaf(4, d, dtype=dtype), leaf(4, d, dtype=dtype)))
                    if prior is not None:
                        backward(ops.mixture_log_prob(z, *prior))
            cases.append((f"gaussian terms+densities {t} d={d} K={K} C={C} S={S}", terms))

        def broadcast_densities(dtype=dtype):
            z = leaf(3, 4, 5, 20, dtype=dtype)                     # [K, B, S, d]
            for shape in ((20,), (4, 1, 20), (4, 5, 20)):
                backward(ops.gaussian_log_prob(z, leaf(*shape, dtype=dtype),
                                               leaf(*shape, dtype=dtype)))
            backward(ops.mixture_log_prob(leaf(2, 4, 100, dtype=dtype), leaf(64, dtype=dtype),
                                          leaf(64, 100, dtype=dtype), leaf(64, 100, dtype=dtype)))
        cases.append((f"broadcast densities {t}", broadcast_densities))

        for K, event in ((1, (784,)), (16, (3, 32, 32)), (4, (5,))):
            def likelihoods(K=K, event=event, dtype=dtype):
                x01 = torch.rand(4, *event).to(dtype)
                backward(ops.bernoulli_log_prob(leaf(K, 4, *event, dtype=dtype), x01))
                x = leaf(4, *event, dtype=dtype)
                for log_scale in (leaf(K, 4, *event, dtype=dtype), leaf(*event, dtype=dtype),
                                  leaf(1, 4, *event, dtype=dtype), 0.0):
                    for fn in (ops.normal_log_prob, ops.laplace_log_prob):
                        backward(fn(leaf(K, 4, *event, dtype=dtype), log_scale, x, 1e-3))
            cases.append((f"likelihoods {t} K={K} event={event}", likelihoods))

        for C in (71, 256, 1000):
            def categorical(C=C, dtype=dtype):
                target = torch.randint(C, (4, 8))
                backward(ops.categorical_log_prob(leaf(16, 4, 8, C, dtype=dtype), target))
            cases.append((f"categorical {t} C={C}", categorical))

        def iwae(dtype=dtype):
            for K in (1, 64, 1000):
                backward(ops.importance_logsumexp(leaf(K, 4, dtype=dtype)))
        cases.append((f"importance_logsumexp {t}", iwae))
    return cases


def _resources(kernel) -> str:
    """Registers, spill stores and shared memory per thread block, as cuobjdump reads the cubin,
    and the blocks (warps) an sm_90 SM can hold with them (:func:`_occupancy.blocks_per_sm`)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                              text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if usage is None:
        return "resources unknown"
    reg, stack, shared, local = usage.groups()
    smem, warps = int(shared) + kernel.metadata.shared, kernel.metadata.num_warps
    blocks = blocks_per_sm(int(reg), smem, warps)
    return (f"regs {reg:>3}  stack {stack:>5}  smem {smem:>6}  warps {warps}  "
            f"blocks/SM {blocks:>2} ({blocks * warps:>2} warps)  {_variant(kernel)}")


def _variant(kernel) -> str:
    """The variant's constexprs and the element type of its first pointer argument."""
    src = getattr(kernel, "src", None)
    if src is None or not hasattr(src, "fn"):
        return ""
    names = src.fn.arg_names
    consts = {names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
    first_ptr = next((t for t in src.signature.values() if str(t).startswith("*")), "")
    shown = " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in consts.items()
                     if k.isupper() and not isinstance(v, (bool, type(None))) or k.isupper())
    return f"{first_ptr} {shown}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--report", action="store_true", help="resources of every variant")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"comma-separated, of {', '.join(DTYPES)}")
    args = parser.parse_args(argv)

    target_only(args.arch)
    JITFunction.__getitem__ = _compile_only
    import mmfast.backend
    failures = []
    with mmfast.backend.use_backend("triton"):
        for name, thunk in _cases(tuple(DTYPES[d] for d in args.dtypes.split(","))):
            if args.k not in name:
                continue
            try:
                thunk()
            except Exception:  # noqa: BLE001  (every failure is listed, then the status says it)
                failures.append(name)
                print(f"FAILED {name}\n{traceback.format_exc(limit=-3)}", flush=True)
    print(f"compiled {len(COMPILED)} kernel variants for sm_{args.arch}; "
          f"{len(failures)} case(s) failed")
    # mmfast pins FMA contraction on (kernels/_launch.py, COMPILE_OPTIONS) whatever Triton's
    # default: the tests run this script with TRITON_DEFAULT_FP_FUSION=0 to see that it holds.
    fused = sum(bool(getattr(k.metadata, "enable_fp_fusion", False)) for _, k in COMPILED.values())
    print(f"fp fusion enabled in {fused} of {len(COMPILED)} kernel variants")
    if args.report:
        for name, kernel in sorted(COMPILED.values(), key=lambda nk: nk[0]):
            print(f"{name:<40} {_resources(kernel)}")
    for name in failures:
        print(f"FAILED {name}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
