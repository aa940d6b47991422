"""Tile sweeps for the kernels whose block heuristics were chosen without a GPU.

Each case times a kernel launcher (mmfast.kernels) at a target shape under several block
configurations, the shipped heuristic first, with the GPU time per call from the CUDA profiler
(as ``device_us`` in the benchmarks) and each configuration's largest relative difference from
the shipped one's outputs (same kernel, other tiling: only rounding may differ). Nothing is
changed in the library: a sweep only reports, and a better configuration becomes a change to
the heuristic, with its figures.

    python benchmarks/tune.py [--out DIR] [--only NAME ...]      (a CUDA GPU)
    python benchmarks/tune.py --dry-run                            (CPU, interpreter, tiny shapes)

Writes DIR/tune.json and DIR/tune.md. The dry run checks on the CPU that every configuration
launches and matches the shipped one, so the sweep cannot rot between GPU sessions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mmfast  # noqa: E402,F401  (registers mmfast.kernels)
from conftest import device_seconds_per_call  # noqa: E402  (benchmarks/conftest.py)
from mmfast.kernels import gaussian_terms, poe, subset_attention, subset_pool  # noqa: E402
from mmfast.subsets import all_subsets  # noqa: E402

DRY = "--dry-run" in sys.argv
DEVICE = torch.device("cpu" if DRY else "cuda")


def _device_us(call: Callable[[], object]) -> float:
    """GPU time per call in µs (the benchmarks' CUDA-profiler measure), after a warm-up."""
    for _ in range(3):
        call()
    return device_seconds_per_call(call) * 1e6


def _rel_diff(a, b) -> float:
    """Largest |a − b| over max(1, |b|), over every output tensor."""
    pairs = zip(a, b) if isinstance(a, (tuple, list)) else [(a, b)]
    worst = 0.0
    for x, y in pairs:
        if x is None or x.numel() == 0:
            continue
        x, y = x.double(), y.double()
        worst = max(worst, ((x - y).abs() / y.abs().clamp_min(1.0)).max().item())
    return worst


def _bank(B: int, M: int) -> torch.Tensor:
    bank = all_subsets(M).to(DEVICE)
    return bank.expand(B, *bank.shape)


def _randn(*shape, scale=1.0):
    return torch.randn(shape, device=DEVICE) * scale


def pool_cases(small: bool):
    B, M, D = (2, 4, 40) if small else (4096, 8, 512)
    mask = _bank(B, M)
    x = _randn(B, M, D)
    g = _randn(B, mask.shape[1], D)
    # The shipped tiles are (8, 512, 2, 4) both ways: 4 features a thread. Alternatives: 8
    # features a thread (2 warps), more or fewer subsets a chunk, and the tiles shipped before.
    backward = [None, (8, 512, 4, 4), (8, 512, 1, 4), (8, 512, 2, 2), (8, 512, 4, 2),
                (8, 256, 2, 2), (8, 512, 2, 8)]
    forward = [None, (8, 512, 4, 4), (8, 512, 1, 4), (8, 512, 2, 2), (8, 256, 2, 4),
               (8, 256, 2, 2)]
    yield ("subset_pool backward, bank B=%d M=%d S=%d D=%d" % (B, M, mask.shape[1], D),
           "_backward_blocks (BLOCK_M, BLOCK_D, CHUNK_S, warps)", subset_pool, "_backward_blocks",
           backward, lambda: subset_pool.launch_pool_transpose(g, mask, M, x.dtype))
    yield ("subset_pool forward, bank B=%d M=%d S=%d D=%d" % (B, M, mask.shape[1], D),
           "_forward_blocks (BLOCK_M, BLOCK_D, CHUNK_S, warps)", subset_pool, "_forward_blocks",
           forward, lambda: subset_pool.launch_pool(x, mask))


def poe_cases(small: bool):
    B, M, D = (2, 4, 40) if small else (4096, 8, 512)
    mask = _bank(B, M)
    mu, lv = _randn(B, M, D), _randn(B, M, D, scale=0.5)
    gm, gv = _randn(B, mask.shape[1], D), _randn(B, mask.shape[1], D)
    out_mu, out_lv = poe.gaussian_poe_forward(mu, lv, mask, None, None)
    # The shipped tiles are (8, 512, 1, 4) both ways (ROW_BITS: one 16-byte vector of features
    # a thread, one subset a chunk). Alternatives: two subsets a chunk, fewer features a
    # program (fewer warps), and lanes along the subsets (128 features, 1 or 4 warps). Every
    # one keeps all 8 modalities' features in each thread: at this shape the backward takes 255
    # registers, 2 blocks of 4 warps an SM (sm_90, Triton 3.6 and 3.9). Triton's default layout
    # (ROW_BITS off) with one subset a chunk takes 122 (4 blocks) and the forward 56 (Triton
    # 3.6; benchmarks/results/cpu_static/): more instructions an element, twice the warps to
    # keep loads in flight. The last is the tiling shipped before the register tiles.
    default_layout = {"_row_bits": False}
    configs = [None, (8, 512, 2, 4), (8, 256, 1, 2), (8, 256, 2, 2), (8, 128, 1, 1),
               (8, 128, 4, 4), {**default_layout, "_blocks": (8, 128, 1, 4)},
               {**default_layout, "_blocks": (8, 64, 1, 2)},
               {**default_layout, "_blocks": (8, 128, 4, 4)}]
    shape = "bank B=%d M=%d S=%d d=%d" % (B, M, mask.shape[1], D)
    yield ("gaussian_poe forward, " + shape, "_blocks (BLOCK_M, BLOCK_D, CHUNK_S, warps)", poe,
           "_blocks", configs, lambda: poe.gaussian_poe_forward(mu, lv, mask, None, None))
    yield ("gaussian_poe backward, " + shape, "_blocks (BLOCK_M, BLOCK_D, CHUNK_S, warps)", poe,
           "_blocks", configs,
           lambda: poe.gaussian_poe_backward(gm, gv, mu, lv, mask, None, None, out_mu, out_lv))


def attention_cases(small: bool):
    # B = 1024 rather than the target's 4096: the bank's [B, 255, 8, 256] output and its float64
    # copy for the comparison stay within the GPU's memory; each row costs the same.
    B, M, E, H = (2, 4, 32, 2) if small else (1024, 8, 256, 4)
    mask = _bank(B, M)
    q, k, v = _randn(B, M, E), _randn(B, M, E), _randn(B, M, E)
    scale = (E // H) ** -0.5
    out, lse = subset_attention.subset_attention_forward(q, k, v, mask, H, scale)
    g = _randn(*out.shape)
    # small_blocks: (BLOCK_M, CHUNK_S, DI, DL, warps); shipped (8, 4, 4, 16, 4) forward and
    # (8, 2, 4, 16, 4) backward at this shape. Compiled for sm_90, the backward's 2 subsets a
    # chunk take 168 registers with Triton 3.6 (3 blocks of 4 warps an SM) but 255 and spills
    # outside the loop with 3.9 (2 blocks); 1 subset a chunk takes 154-156 with either (3
    # blocks), 4 take 227-255 (2); 2 features a thread over 8 warps, one query a warp, 105
    # (Triton 3.6: 2 blocks of 8 warps, sums over queries through shared memory). The forward
    # takes 64-96 registers at 1 to 4 subsets a chunk.
    shape = "bank B=%d M=%d S=%d E=%d H=%d" % (B, M, mask.shape[1], E, H)
    knob = "small_blocks (BLOCK_M, CHUNK_S, DI, DL, warps)"
    yield ("subset_attention forward (small kernel), " + shape, knob, subset_attention,
           "small_blocks", [None, (8, 1, 4, 16, 4), (8, 2, 4, 16, 4), (8, 8, 4, 16, 4)],
           lambda: subset_attention.subset_attention_forward(q, k, v, mask, H, scale))
    yield ("subset_attention backward (small kernel), " + shape, knob, subset_attention,
           "small_blocks", [None, (8, 1, 4, 16, 4), (8, 4, 4, 16, 4), (8, 1, 2, 32, 8)],
           lambda: subset_attention.subset_attention_backward(g, q, k, v, mask, out, lse, H,
                                                              scale))


def terms_cases(small: bool):
    B, K = (6, 5) if small else (4096, 64)
    for d in ((5,) if small else (20, 64)):
        mu_s, lv_s, mu_f, lv_f = (_randn(B, d, scale=0.5) for _ in range(4))
        eps_s, eps_f = _randn(K, B, d), _randn(K, B, d)
        gz, gq = _randn(K, B, d), _randn(K, B)
        shape = "standard prior B=%d d=%d K=%d" % (B, d, K)

        def both(mu_s=mu_s, lv_s=lv_s, mu_f=mu_f, lv_f=lv_f, eps_s=eps_s, eps_f=eps_f, gz=gz,
                 gq=gq):
            out = gaussian_terms.gaussian_subset_terms_forward(mu_s, lv_s, eps_s, None, None,
                                                               None, True)
            out += gaussian_terms.gaussian_full_terms_forward(mu_f, lv_f, eps_f, mu_s, lv_s, True)
            out += gaussian_terms.gaussian_subset_terms_backward(gz, gq, gq, mu_s, lv_s, eps_s,
                                                                 None, None, None, True)[:3]
            out += gaussian_terms.gaussian_full_terms_backward(gz, gq, gq, mu_f, lv_f, eps_f,
                                                               mu_s, lv_s, True)
            return out
        yield ("gaussian_terms forward+backward (4 kernels), " + shape,
               "MAX_BLOCK_K (samples a program holds at once)", gaussian_terms, "MAX_BLOCK_K",
               [None, 1, 2, 4, 16], both)


CASES = {"pool": pool_cases, "poe": poe_cases, "attention": attention_cases,
         "terms": terms_cases}


def _as_setting(shipped, config):
    """A block heuristic is replaced by a constant function, a constant by the value."""
    if config is None:
        return shipped
    return (lambda *args, _c=config, **kwargs: _c) if callable(shipped) else config


def _apply(module, attr: str, config) -> dict:
    """Set ``module.attr`` to ``config`` (a dict sets several attributes by name); returns the
    attributes it replaced, to restore."""
    settings = config if isinstance(config, dict) else {attr: config}
    shipped = {name: getattr(module, name) for name in settings}
    for name, value in settings.items():
        setattr(module, name, _as_setting(shipped[name], value))
    return shipped


def sweep(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        for title, knob, module, attr, configs, call in CASES[name](small=DRY):
            reference = None
            for config in configs:
                shipped = _apply(module, attr, config)
                try:
                    t0 = time.perf_counter()
                    out = call()
                    diff = 0.0 if reference is None else _rel_diff(out, reference)
                    reference = out if reference is None else reference
                    us = None if DRY else _device_us(call)
                    row = dict(case=title, knob=knob, config="shipped" if config is None
                               else str(config), kernel_us=us, max_rel_diff=diff,
                               first_call_s=round(time.perf_counter() - t0, 3))
                except Exception as error:   # a configuration that does not compile or launch
                    row = dict(case=title, knob=knob, config=str(config),
                               error=f"{type(error).__name__}: {error}"[:300])
                finally:
                    for restored, value in shipped.items():
                        setattr(module, restored, value)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    device = "dry run (CPU, interpreter)" if DRY else torch.cuda.get_device_name()
    lines = [f"Tile sweeps on {device}; kernel µs from the CUDA profiler (sum of the kernels' "
             "durations per call); the shipped heuristic first.", ""]
    case = None
    for row in rows:
        if row["case"] != case:
            case = row["case"]
            lines += ["", f"**{case}** — {row['knob']}", "", "| config | kernel µs | vs shipped "
                      "| max rel. diff |", "|---|---|---|---|"]
            base = row.get("kernel_us")
        if "error" in row:
            lines.append(f"| {row['config']} | error: {row['error']} | | |")
            continue
        us = row["kernel_us"]
        ratio = f"{base / us:.2f}x" if us and base else "—"
        lines.append(f"| {row['config']} | {us:,.1f} | {ratio} | {row['max_rel_diff']:.1e} |"
                     if us is not None else f"| {row['config']} | — | — | "
                     f"{row['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/tune")
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shapes: launch and compare only")
    args = parser.parse_args(argv)
    if not DRY and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --dry-run)")
    torch.manual_seed(0)
    rows = sweep(args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(rows, indent=1))
    (out / "tune.md").write_text(markdown(rows))
    bad = [r for r in rows if "error" in r or r.get("max_rel_diff", 0) > 1e-3]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
