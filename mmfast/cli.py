"""The ``mmfast`` command line.

``mmfast demo`` is the README's main job. Until the model layer lands it demonstrates the ops on
a built-in random problem: every subset of five modalities pooled, attended over and combined
as a product of experts, on the backend in force.
"""
from __future__ import annotations

import argparse
import sys
import time


def _demo_ops(args: argparse.Namespace) -> int:
    import torch

    import mmfast as mf

    gen = torch.Generator().manual_seed(args.seed)
    B, M, E, d = args.batch, 5, 32, 8
    bank = mf.subsets.all_subsets(M, include_empty=True)              # [32, 5]
    masks = bank.expand(B, *bank.shape)                                # stride-0 bank
    feats = torch.randn(B, M, E, generator=gen)
    mu, logvar = torch.randn(B, M, d, generator=gen), torch.randn(B, M, d, generator=gen)
    print(f"mmfast {mf.__version__}: backend {mf.current_backend()!r}, "
          f"B={B}, M={M}, {bank.shape[0]} subsets per sample")
    t0 = time.perf_counter()
    pooled = mf.ops.subset_sum_pool(feats, masks)
    attended = mf.ops.subset_attention(feats, feats, feats, masks, num_heads=4)
    poe_mu, poe_logvar = mf.ops.gaussian_poe(mu, logvar, masks)
    elapsed = time.perf_counter() - t0
    sizes = bank.sum(-1)
    print(f"{'|S|':>4} {'mean ‖pool‖':>12} {'mean ‖attn‖':>12} {'PoE var':>10}")
    for k in range(M + 1):
        sel = sizes == k
        print(f"{k:>4} {pooled[:, sel].norm(dim=-1).mean():12.3f} "
              f"{attended[:, sel].norm(dim=-1).mean():12.3f} "
              f"{poe_logvar[:, sel].exp().mean():10.4f}")
    print(f"ops took {elapsed * 1e3:.1f} ms; the PoE variance shrinks as experts join the subset")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in demonstration")
    demo.add_argument("--batch", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo_ops)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
