"""Bad inputs to the public ops raise ValueError / TypeError whose message names the argument,
its shape and the shape expected (DESIGN.md). Validation runs before any backend is chosen, so
these tests need no backend fixture."""
from __future__ import annotations

import re

import pytest
import torch

from mmfast import ops

B, M, D = 3, 4, 5


def f64(*shape, device="cpu"):
    return torch.zeros(*shape, dtype=torch.float64, device=device)


def mask(*shape, device="cpu"):
    return torch.ones(*shape, dtype=torch.bool, device=device)


def shape(*dims) -> str:
    """A shape as the messages print it, escaped for a regex: [3, 4, 5]."""
    return re.escape(str(list(dims)))


x, m = f64(B, M, D), mask(B, M)
qkv = f64(B, M, 8)
z, mu, lv = f64(2, B, D), f64(B, D), f64(B, D)
logits_k, target = f64(2, B, 6, 7), torch.zeros(B, 6, dtype=torch.int64)
loc, obs = f64(2, B, 6), f64(B, 6)

# (id, call, exception, regex that must appear in the message)
CASES = [
    # subset_sum_pool
    ("pool x rank", lambda: ops.subset_sum_pool(f64(B, D), m), ValueError,
     rf"x has shape {shape(B, D)}.*expected rank 3.*\[B, M, D\]"),
    ("pool x int", lambda: ops.subset_sum_pool(x.long(), m), TypeError,
     r"x has dtype torch.int64"),
    ("pool x not tensor", lambda: ops.subset_sum_pool([[0.0]], m), TypeError, r"x must be a torch.Tensor"),
    ("pool mask dtype", lambda: ops.subset_sum_pool(x, m.float()), TypeError,
     r"mask has dtype torch.float32; expected torch.bool"),
    ("pool mask B", lambda: ops.subset_sum_pool(x, mask(B + 1, M)), ValueError,
     rf"mask has shape {shape(B + 1, M)}; expected {shape(B, M)} or \[{B}, S, {M}\]"),
    ("pool mask M", lambda: ops.subset_sum_pool(x, mask(B, 2, M + 1)), ValueError,
     rf"mask has shape {shape(B, 2, M + 1)}; expected {shape(B, M)}"),
    ("pool mask rank", lambda: ops.subset_sum_pool(x, mask(B, 1, 1, M)), ValueError,
     rf"mask has shape {shape(B, 1, 1, M)}"),
    ("pool devices", lambda: ops.subset_sum_pool(x, mask(B, M, device="meta")), ValueError,
     r"different devices \(x on cpu, mask on meta\)"),
    # subset_attention
    ("attn q rank", lambda: ops.subset_attention(f64(M, 8), qkv, qkv, m, 2), ValueError,
     rf"q has shape {shape(M, 8)}.*expected rank 3"),
    ("attn k shape", lambda: ops.subset_attention(qkv, f64(B, M, 6), qkv, m, 2), ValueError,
     rf"k has shape {shape(B, M, 6)}; expected {shape(B, M, 8)}"),
    ("attn v shape", lambda: ops.subset_attention(qkv, qkv, f64(B, M + 1, 8), m, 2), ValueError,
     rf"v has shape {shape(B, M + 1, 8)}; expected {shape(B, M, 8)}"),
    ("attn heads", lambda: ops.subset_attention(qkv, qkv, qkv, m, 3), ValueError,
     rf"q has shape {shape(B, M, 8)}.*E=8.*divisible by num_heads=3"),
    ("attn heads zero", lambda: ops.subset_attention(qkv, qkv, qkv, m, 0), ValueError,
     r"num_heads must be a positive int"),
    ("attn dtype mix", lambda: ops.subset_attention(qkv, qkv.float(), qkv, m, 2), TypeError,
     r"different dtypes \(q torch.float64, k torch.float32"),
    ("attn int", lambda: ops.subset_attention(qkv.long(), qkv, qkv, m, 2), TypeError,
     r"q has dtype torch.int64"),
    ("attn mask", lambda: ops.subset_attention(qkv, qkv, qkv, mask(B, M - 1), 2), ValueError,
     rf"mask has shape {shape(B, M - 1)}; expected {shape(B, M)}"),
    ("attn mask dtype", lambda: ops.subset_attention(qkv, qkv, qkv, m.int(), 2), TypeError,
     r"mask has dtype torch.int32"),
    ("attn devices", lambda: ops.subset_attention(qkv, qkv, qkv.to("meta"), m, 2), ValueError,
     r"different devices.*v on meta"),
    # gaussian_poe
    ("poe logvar shape", lambda: ops.gaussian_poe(x, f64(B, M, D + 1), m), ValueError,
     rf"logvar has shape {shape(B, M, D + 1)}; expected {shape(B, M, D)}"),
    ("poe mu rank", lambda: ops.gaussian_poe(f64(M, D), f64(M, D), m), ValueError,
     rf"mu has shape {shape(M, D)}.*expected rank 3.*\[B, M, d\]"),
    ("poe mask", lambda: ops.gaussian_poe(x, x, mask(B + 2, M)), ValueError,
     rf"mask has shape {shape(B + 2, M)}"),
    ("poe prior type", lambda: ops.gaussian_poe(x, x, m, prior="standard"), TypeError,
     r"prior must be True, False or a pair"),
    ("poe prior triple", lambda: ops.gaussian_poe(x, x, m, prior=(f64(D),) * 3), TypeError,
     r"prior must be True, False or a pair"),
    ("poe prior shape", lambda: ops.gaussian_poe(x, x, m, prior=(f64(D + 1), f64(D))), ValueError,
     rf"prior\[0\] \(mu_p\) has shape {shape(D + 1)}; expected \[{D}\] or \[{B}, {D}\]"),
    ("poe prior batch", lambda: ops.gaussian_poe(x, x, m, prior=(f64(D), f64(B + 1, D))), ValueError,
     rf"prior\[1\] \(logvar_p\) has shape {shape(B + 1, D)}; expected \[{D}\] or \[{B}, {D}\]"),
    ("poe int", lambda: ops.gaussian_poe(x.int(), x.int(), m), TypeError, r"mu has dtype torch.int32"),
    ("poe devices", lambda: ops.gaussian_poe(x, x.to("meta"), m), ValueError,
     r"different devices.*logvar on meta"),
    # gaussian_log_prob / mixture_log_prob
    ("gauss d", lambda: ops.gaussian_log_prob(z, f64(B, D + 1), f64(B, D + 1)), ValueError,
     rf"mu has shape {shape(B, D + 1)}; expected last size d={D}"),
    ("gauss batch", lambda: ops.gaussian_log_prob(z, f64(B + 1, D), f64(B + 1, D)), ValueError,
     rf"mu has shape {shape(B + 1, D)}; expected \[\*batch, d\] broadcastable.*{shape(B, D)}"),
    ("gauss logvar", lambda: ops.gaussian_log_prob(z, mu, f64(1, D)), ValueError,
     rf"logvar has shape {shape(1, D)}; expected {shape(B, D)}"),
    ("gauss z rank", lambda: ops.gaussian_log_prob(f64(D), mu, lv), ValueError,
     rf"z has shape {shape(D)}; expected at least 2 dimensions"),
    ("gauss int", lambda: ops.gaussian_log_prob(z.long(), mu, lv), TypeError, r"z has dtype torch.int64"),
    ("gauss devices", lambda: ops.gaussian_log_prob(z, mu.to("meta"), lv.to("meta")), ValueError,
     r"different devices.*z on cpu, mu on meta"),
    ("mixture mu", lambda: ops.mixture_log_prob(z, f64(3), f64(3, D + 1), f64(3, D)), ValueError,
     rf"mu has shape {shape(3, D + 1)}; expected {shape(3, D)}"),
    ("mixture logits rank", lambda: ops.mixture_log_prob(z, f64(1, 3), f64(3, D), f64(3, D)),
     ValueError, rf"logits has shape {shape(1, 3)}.*expected rank 1"),
    ("mixture logvar", lambda: ops.mixture_log_prob(z, f64(3), f64(3, D), f64(2, D)), ValueError,
     rf"logvar has shape {shape(2, D)}; expected {shape(3, D)}"),
    # likelihoods
    ("bernoulli x", lambda: ops.bernoulli_log_prob(loc, f64(B, 7)), ValueError,
     rf"x has shape {shape(B, 7)}; expected {shape(B, 6)}"),
    ("bernoulli rank", lambda: ops.bernoulli_log_prob(f64(B), f64(B)), ValueError,
     rf"logits has shape {shape(B)}; expected at least 2 dimensions"),
    ("bernoulli int", lambda: ops.bernoulli_log_prob(loc, obs.long()), TypeError, r"x has dtype torch.int64"),
    ("categorical target dtype", lambda: ops.categorical_log_prob(logits_k, target.float()), TypeError,
     r"target has dtype torch.float32; expected torch.int64"),
    ("categorical target shape", lambda: ops.categorical_log_prob(logits_k, target[:, :5]), ValueError,
     rf"target has shape {shape(B, 5)}; expected {shape(B, 6)}"),
    ("categorical class range", lambda: ops.categorical_log_prob(logits_k, target + logits_k.shape[-1]),
     ValueError, r"target has class indices in \[\d+, \d+\]; expected values in \[0, \d+\)"),
    ("categorical rank", lambda: ops.categorical_log_prob(f64(2, B), target[:, 0]), ValueError,
     rf"logits has shape {shape(2, B)}; expected at least 3 dimensions"),
    ("normal x", lambda: ops.normal_log_prob(loc, 0.0, f64(B + 1, 6)), ValueError,
     rf"x has shape {shape(B + 1, 6)}; expected {shape(B, 6)}"),
    ("normal log_scale", lambda: ops.normal_log_prob(loc, f64(5), obs), ValueError,
     rf"log_scale has shape {shape(5)}; expected a shape that broadcasts to loc {shape(2, B, 6)}"),
    ("laplace log_scale", lambda: ops.laplace_log_prob(loc, f64(3, B, 6), obs), ValueError,
     rf"log_scale has shape {shape(3, B, 6)}; expected a shape that broadcasts to loc"),
    ("laplace min_scale", lambda: ops.laplace_log_prob(loc, 0.0, obs, min_scale=-1.0), ValueError,
     r"min_scale must be >= 0"),
    ("normal int", lambda: ops.normal_log_prob(loc.long(), 0.0, obs), TypeError, r"loc has dtype torch.int64"),
    ("normal devices", lambda: ops.normal_log_prob(loc, 0.0, obs.to("meta")), ValueError,
     r"different devices.*x on meta"),
    # gaussian_terms
    ("terms posterior pair", lambda: ops.gaussian_terms(mu, z), TypeError,
     r"posterior_s must be a pair"),
    ("terms logvar", lambda: ops.gaussian_terms((mu, f64(B, D + 1)), z), ValueError,
     rf"posterior_s\[1\] has shape {shape(B, D + 1)}; expected {shape(B, D)}"),
    ("terms mu rank", lambda: ops.gaussian_terms((f64(D), f64(D)), z), ValueError,
     rf"posterior_s\[0\] has shape {shape(D)}.*expected rank 2 or 3"),
    ("terms eps", lambda: ops.gaussian_terms((mu, lv), f64(2, B, D + 1)), ValueError,
     rf"eps_s has shape {shape(2, B, D + 1)}; expected \[K, {B}, {D}\]"),
    ("terms eps rank", lambda: ops.gaussian_terms((mu, lv), f64(B, D)), ValueError,
     rf"eps_s has shape {shape(B, D)}.*expected rank 3"),
    ("terms full shape", lambda: ops.gaussian_terms((mu, lv), z, (f64(B + 1, D), f64(B + 1, D)), z),
     ValueError, rf"posterior_full\[0\] has shape {shape(B + 1, D)}; expected {shape(B, D)}"),
    ("terms eps_full missing", lambda: ops.gaussian_terms((mu, lv), z, (mu, lv)), ValueError,
     rf"eps_full \[K, {B}, {D}\] is required"),
    ("terms eps_full K", lambda: ops.gaussian_terms((mu, lv), z, (mu, lv), f64(3, B, D)), ValueError,
     rf"eps_full has shape {shape(3, B, D)}; expected {shape(2, B, D)}"),
    ("terms prior", lambda: ops.gaussian_terms((mu, lv), z, prior=(f64(3), f64(3, D))), TypeError,
     r"prior must be None or \(logits \[C\], mu \[C, d\], logvar \[C, d\]\)"),
    ("terms prior mu", lambda: ops.gaussian_terms((mu, lv), z, prior=(f64(3), f64(3, D + 1), f64(3, D))),
     ValueError, rf"prior mu has shape {shape(3, D + 1)}; expected {shape(3, D)}"),
    ("terms int", lambda: ops.gaussian_terms((mu.long(), lv), z), TypeError,
     r"posterior_s\[0\] has dtype torch.int64"),
    ("terms dtype mix", lambda: ops.gaussian_terms((mu, lv), z.float()), TypeError, r"different dtypes"),
    ("terms devices", lambda: ops.gaussian_terms((mu, lv), z.to("meta")), ValueError,
     r"different devices.*eps_s on meta"),
]


@pytest.mark.parametrize("call,error,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_with_a_clear_message(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_messages_name_the_op():
    with pytest.raises(ValueError, match=r"^subset_sum_pool: "):
        ops.subset_sum_pool(f64(B, D), m)
    with pytest.raises(ValueError, match=r"^gaussian_terms: "):
        ops.gaussian_terms((mu, lv), z, (mu, lv))


def test_valid_inputs_pass_the_same_checks():
    """The reference call sites of the bad cases, with correct inputs, do not raise."""
    ops.subset_sum_pool(x, m)
    ops.subset_sum_pool(x, mask(B, 2, M))
    ops.subset_attention(qkv, qkv, qkv, m, 2)
    ops.gaussian_poe(x, x, m, prior=(f64(D), f64(B, D)))
    ops.gaussian_log_prob(z, mu, lv)
    ops.mixture_log_prob(z, f64(3), f64(3, D), f64(3, D))
    ops.bernoulli_log_prob(loc, obs)
    ops.categorical_log_prob(logits_k, target)
    ops.normal_log_prob(loc, f64(6), obs)
    ops.laplace_log_prob(loc, 0.0, obs, min_scale=0.1)
    ops.gaussian_terms((mu, lv), z, (mu, lv), z, prior=(f64(3), f64(3, D), f64(3, D)))
