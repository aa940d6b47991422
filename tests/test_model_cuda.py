"""The model on a GPU: the automatic backend (Triton kernels where they exist) gives the
reference backend's objective, log-likelihood and gradients. Skipped without CUDA."""
import pytest
import torch

import mmfast as mf
from mmfast.nn import AGGREGATORS

pytestmark = pytest.mark.cuda


def _model(name, d=4, dims=(6, 5, 7)):
    torch.manual_seed(0)
    expert = name in ("PoE", "MoE")
    E = 2 * d if expert else 32
    options = {} if expert else dict(hidden=32)
    if name.startswith("SelfAttention"):
        options.update(width=32)
    mods = {f"m{i}": mf.Modality(mf.nn.MLPEncoder(D, E, (32,)), mf.nn.MLPDecoder(d, D, (32,)),
                                 "laplace", scale="learned") for i, D in enumerate(dims)}
    prior = mf.priors.GaussianMixture(d, 3)
    return mf.MultiModalVAE(mods, AGGREGATORS[name](E, d, **options), prior).cuda(), dims


@pytest.mark.parametrize("kind", ["masked", "mixture"])
@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_auto_backend_matches_reference_on_gpu(name, kind):
    model, dims = _model(name)
    B = 33
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = {f"m{i}": torch.randn(B, D, device="cuda", generator=gen) for i, D in enumerate(dims)}
    observed = torch.rand(B, 3, device="cuda", generator=gen) < 0.7
    bank = mf.subsets.all_subsets(3, include_empty=True, device="cuda").expand(B, -1, -1)
    results = {}
    for backend in ("reference", "auto"):
        with mf.use_backend(backend):
            torch.manual_seed(2)
            out = model.objective(x, observed=observed, subset=bank, kind=kind, num_samples=3)
            model.zero_grad()
            out.loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            torch.manual_seed(3)
            ll = model.log_likelihood(x, observed=observed, num_samples=64)
            results[backend] = (out.value.detach(), ll, grads)
    ref, auto = results["reference"], results["auto"]
    torch.testing.assert_close(auto[0], ref[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(auto[1], ref[1], rtol=1e-4, atol=1e-3)
    for a, r in zip(auto[2], ref[2]):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3)
