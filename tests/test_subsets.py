"""mmfast.subsets: enumeration in bitmask order, codes, and the subset distribution ρ(S) of
METHOD.md (each observed modality joins independently with probability 1/2)."""
from __future__ import annotations

import itertools

import pytest
import torch

from mmfast.subsets import all_subsets, decode, encode, sample_subsets


def brute_subsets(M: int, include_empty: bool) -> list[list[bool]]:
    """Subsets by code: code c holds modality m iff bit m of c is set."""
    start = 0 if include_empty else 1
    return [[bool(code >> m & 1) for m in range(M)] for code in range(start, 2 ** M)]


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("include_empty", [False, True])
def test_all_subsets_in_bitmask_order(M, include_empty):
    bank = all_subsets(M, include_empty=include_empty)
    assert bank.dtype == torch.bool
    assert bank.shape == (2 ** M - (0 if include_empty else 1), M)
    assert bank.tolist() == brute_subsets(M, include_empty)
    # every subset exactly once
    assert len({tuple(row) for row in bank.tolist()}) == bank.shape[0]


def test_all_subsets_edges():
    assert all_subsets(1).tolist() == [[True]]
    assert all_subsets(1, include_empty=True).tolist() == [[False], [True]]
    assert all_subsets(3)[-1].all() and not all_subsets(3, include_empty=True)[0].any()


@pytest.mark.parametrize("bad", [0, -1, 2.0, "3"])
def test_all_subsets_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="num_modalities must be a positive int"):
        all_subsets(bad)


def test_all_subsets_refuses_too_many():
    with pytest.raises(ValueError, match="too many"):
        all_subsets(25)


@pytest.mark.parametrize("M", [1, 4, 13, 63])
def test_encode_decode_roundtrip(M):
    gen = torch.Generator().manual_seed(M)
    masks = torch.rand(5, 7, M, generator=gen) < 0.5
    codes = encode(masks)
    assert codes.dtype == torch.int64 and codes.shape == (5, 7)
    expected = [[sum(1 << m for m, inside in enumerate(row) if inside) for row in plane]
                for plane in masks.tolist()]
    assert codes.tolist() == expected
    assert torch.equal(decode(codes, M), masks)


def test_codes_of_all_subsets_count_up():
    assert encode(all_subsets(6)).tolist() == list(range(1, 64))
    assert encode(all_subsets(6, include_empty=True)).tolist() == list(range(64))
    assert decode(torch.tensor([0, 5, 6], dtype=torch.int32), 3).tolist() == [
        [False, False, False], [True, False, True], [False, True, True]]


def test_encode_decode_errors():
    with pytest.raises(TypeError, match="encode: mask has dtype torch.int64; expected torch.bool"):
        encode(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"encode: mask has shape \[2, 64\]"):
        encode(torch.ones(2, 64, dtype=torch.bool))
    with pytest.raises(TypeError, match="decode: codes has dtype torch.float32"):
        decode(torch.ones(3), 2)
    with pytest.raises(TypeError, match="decode: codes has dtype torch.bool"):
        decode(torch.ones(3, dtype=torch.bool), 2)
    for bad in (0, 64):
        with pytest.raises(ValueError, match="num_modalities must be in"):
            decode(torch.ones(3, dtype=torch.int64), bad)


def test_sample_subsets_only_draws_observed_modalities():
    gen = torch.Generator().manual_seed(0)
    observed = torch.rand(500, 6, generator=gen) < 0.6
    observed[0] = False
    observed[1] = True
    subsets = sample_subsets(observed, generator=gen)
    assert subsets.dtype == torch.bool and subsets.shape == observed.shape
    assert not (subsets & ~observed).any()
    assert not subsets[0].any()
    # every observed modality is sometimes in, sometimes out
    in_rate = (subsets.sum(0).double() / observed.sum(0).double())
    assert ((in_rate > 0.4) & (in_rate < 0.6)).all(), in_rate


def test_sample_subsets_is_uniform_over_subsets_of_the_observed_set():
    """Chi-square over the 2^3 subsets of {0, 2, 3} with a fixed seed: 7 degrees of freedom;
    P(χ² > 35) < 1e-5 under uniformity, so the bound only trips on a real bias."""
    N = 8000
    observed = torch.tensor([True, False, True, True, False]).expand(N, 5)
    subsets = sample_subsets(observed, generator=torch.Generator().manual_seed(123))
    counts = {}
    for row in subsets.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    possible = {(a, False, b, c, False) for a, b, c in itertools.product([False, True], repeat=3)}
    assert set(counts) <= possible
    expected = N / len(possible)
    chi2 = sum((counts.get(s, 0) - expected) ** 2 / expected for s in possible)
    assert chi2 < 35.0, (chi2, counts)
    # the empty and the full observed set are both drawn
    assert counts.get((False,) * 5, 0) > 0 and counts.get((True, False, True, True, False), 0) > 0


def test_sample_subsets_generator_reproducible():
    observed = torch.ones(64, 7, dtype=torch.bool)
    first = sample_subsets(observed, generator=torch.Generator().manual_seed(7))
    again = sample_subsets(observed, generator=torch.Generator().manual_seed(7))
    other = sample_subsets(observed, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_subsets_does_not_mutate_observed():
    observed = torch.ones(4, 3, dtype=torch.bool)
    before = observed.clone()
    sample_subsets(observed, generator=torch.Generator().manual_seed(0))
    assert torch.equal(observed, before)


def test_sample_subsets_errors():
    with pytest.raises(TypeError, match="observed must be a bool tensor"):
        sample_subsets(torch.ones(2, 3))
    with pytest.raises(TypeError, match="observed must be a bool tensor"):
        sample_subsets([[True, False]])
    with pytest.raises(ValueError, match=r"observed has shape \[2, 3, 4\]; expected \[B, M\]"):
        sample_subsets(torch.ones(2, 3, 4, dtype=torch.bool))
