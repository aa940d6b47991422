"""The eager fast path (mmfast.ops._custom.eager_fast_path): in plain eager mode the public ops
skip the custom-op dispatcher and run the same implementation through a torch.autograd.Function
built from the op's registered autograd. It must give bit-identical values and gradients to the
custom op, and must step aside wherever the op itself has to be seen."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mmfast
from conftest import require_backend
from mmfast.ops._custom import EAGER_PATHS, _plain_eager
from test_compile import FAMILIES, family_cases


def test_every_op_and_backward_op_has_an_eager_path():
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmfast::")}
    assert registered == set(EAGER_PATHS)


def _floating(outputs):
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return [o for o in outputs if o.is_floating_point()]


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_eager_path_is_bit_identical_to_the_custom_op(backend, family):
    gen = torch.Generator().manual_seed(3)
    for op, args in family_cases(backend, family):
        if op._qualified_op_name.endswith("_backward"):
            continue               # reached through the forward's backward below
        fast = EAGER_PATHS[op._qualified_op_name]
        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        via_op, via_fast = _floating(op(*args)), _floating(fast(*args))
        assert type(via_fast[0].grad_fn).__name__.endswith("_eagerBackward")
        cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)
                      for o in via_op]
        grads_op = torch.autograd.grad(via_op, wrt, cotangents, allow_unused=True)
        grads_fast = torch.autograd.grad(via_fast, wrt, cotangents, allow_unused=True)
        for a, b in zip(via_op + list(grads_op), via_fast + list(grads_fast)):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), op


def test_an_output_without_gradient_gives_the_same_gradients_on_both_paths():
    """Only the mean of a PoE used: its logvar's cotangent is absent on both paths."""
    mu = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 3) < 0.6
    with mmfast.use_backend("reference"):
        fast = torch.autograd.grad(mmfast.ops.gaussian_poe(mu, logvar, mask, prior=False)[0].sum(),
                                   (mu, logvar))
        slow = torch.autograd.grad(torch.ops.mmfast.gaussian_poe(mu, logvar, mask, None, None)[0]
                                   .sum(), (mu, logvar))
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_the_op_itself_is_used_where_it_must_be_seen():
    x = torch.randn(2, 3)
    assert _plain_eager((x, 1.0))
    with FlopCounterMode(display=False):                   # a dispatch mode
        assert not _plain_eager((x,))
    assert not _plain_eager((x.to("meta"),))
    with torch.device("cpu"):                              # a torch-function mode
        assert not _plain_eager((x,))

    class Sub(torch.Tensor):
        pass
    assert not _plain_eager((x.as_subclass(Sub),))
    seen = []

    @torch.compile(fullgraph=True, backend="eager")
    def compiled(t):
        seen.append(_plain_eager((t,)))
        return t + 1
    compiled(x)
    assert seen == [False]


def test_functorch_transforms_see_the_op():
    seen = []

    def record(t):
        seen.append(_plain_eager((t,)))
        return t * 2
    torch.func.vmap(record)(torch.randn(3, 2))
    torch.func.grad(lambda t: record(t).sum())(torch.randn(2))
    assert seen == [False, False]


def test_public_op_and_its_backward_reach_the_dispatcher_under_a_dispatch_mode():
    """The routing itself, not only the predicate: a dispatch mode active for the forward and
    backward sees both custom ops; one entered only for the backward of a fast-path forward
    still sees the backward op. Parameters take the fast path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    x = torch.nn.Parameter(torch.randn(2, 3, 4, dtype=torch.float64))
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    with mmfast.use_backend("reference"):
        with Record() as both:
            mmfast.ops.subset_sum_pool(x, mask).sum().backward()
        out = mmfast.ops.subset_sum_pool(x, mask)
        assert type(out.grad_fn).__name__.endswith("_eagerBackward")
        with Record() as backward_only:
            out.sum().backward()
    assert {"mmfast::subset_sum_pool", "mmfast::subset_sum_pool_backward"} <= set(both.ops)
    assert "mmfast::subset_sum_pool_backward" in backward_only.ops
    assert "mmfast::subset_sum_pool" not in backward_only.ops


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_differentiating_a_backward_again_raises(backend):
    """No op has a second-order formula: create_graph=True must run the backward op itself, so
    that differentiating its result raises rather than silently dropping terms (the kernels'
    gradients carry no graph)."""
    require_backend(backend, "subset_sum_pool", "subset_pool")
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4) < 0.5
    g, = torch.autograd.grad((mmfast.ops.subset_sum_pool(x, mask) ** 2).sum(), x,
                             create_graph=True)
    with pytest.raises(RuntimeError, match="subset_sum_pool_backward"):
        ((g ** 2).sum() + 0 * x.sum()).backward()


def test_the_jit_tracer_records_the_op():
    x, mask = torch.randn(3, 4, 5), torch.rand(3, 4) < 0.5
    with mmfast.use_backend("reference"):
        traced = torch.jit.trace(lambda t: mmfast.ops.subset_sum_pool(t, mask), (x,))
        assert "mmfast::subset_sum_pool" in str(traced.graph)
        assert torch.equal(traced(x), mmfast.ops.subset_sum_pool(x, mask))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_outputs_are_not_views_and_can_be_changed_in_place(backend):
    require_backend(backend, "gaussian_poe", "poe")
    require_backend(backend, "subset_attention", "subset_attention")
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4) < 0.5
    outputs = [mmfast.ops.subset_sum_pool(x, mask), *mmfast.ops.gaussian_poe(x, x, mask),
               mmfast.ops.subset_attention(x, x, x, mask, 2)]
    for out in outputs:
        assert not out._is_view()
        out.add_(1.0)


def test_forward_mode_ad_raises_instead_of_giving_zero_tangents():
    import torch.autograd.forward_ad as fwAD
    x, mask = torch.randn(3, 4, 5), torch.rand(3, 4) < 0.5
    with mmfast.use_backend("reference"):
        with pytest.raises(NotImplementedError, match="mmfast::subset_sum_pool.*forward-mode"):
            torch.func.jvp(lambda t: mmfast.ops.subset_sum_pool(t, mask), (x,), (torch.ones_like(x),))
        with pytest.raises(NotImplementedError, match="forward-mode"):     # jvp outside vmap
            torch.func.jvp(torch.func.vmap(lambda t: mmfast.ops.subset_sum_pool(t, mask[:1])),
                           (x.unsqueeze(1),), (torch.ones_like(x).unsqueeze(1),))
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
            mmfast.ops.subset_sum_pool(fwAD.make_dual(x, torch.ones_like(x)), mask)
        with fwAD.dual_level():                    # a dual level alone, no dual input: fine
            assert torch.equal(mmfast.ops.subset_sum_pool(x, mask),
                               torch.ops.mmfast.subset_sum_pool(x, mask))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("prior_kind", ["standard", "mixture"])
@pytest.mark.parametrize("stl", [True, False])
def test_gaussian_terms_one_node_path_is_bit_identical_to_the_two_ops(backend, prior_kind, stl):
    """With both posteriors, eager gaussian_terms runs both ops under one autograd node
    (objective._BothTerms): values and gradients must be those of the two custom ops, the
    contributions of both to mu_s's and logvar_s's gradients included."""
    from test_ops_objective import make_inputs, require
    require(backend, True)
    gen = torch.Generator().manual_seed(11)
    leaf = make_inputs(3, 4, 2, 5, gen, prior_kind=prior_kind, dtype=torch.float32)
    prior = ((leaf["logits"], leaf["prior_mu"], leaf["prior_logvar"])
             if prior_kind == "mixture" else (None, None, None))
    fast = mmfast.ops.gaussian_terms((leaf["mu_s"], leaf["logvar_s"]), leaf["eps_s"],
                                     (leaf["mu_f"], leaf["logvar_f"]), leaf["eps_f"],
                                     prior=None if prior[0] is None else prior, stl=stl)
    assert type(fast.z_s.grad_fn).__name__ == "_BothTermsBackward"
    ops = torch.ops.mmfast
    slow = (*ops.gaussian_subset_terms(leaf["mu_s"], leaf["logvar_s"], leaf["eps_s"], *prior, stl),
            *ops.gaussian_full_terms(leaf["mu_f"], leaf["logvar_f"], leaf["eps_f"], leaf["mu_s"],
                                     leaf["logvar_s"], stl))
    wrt = list(leaf.values())
    cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in slow]
    grads_fast = torch.autograd.grad(tuple(fast), wrt, cotangents)
    grads_slow = torch.autograd.grad(slow, wrt, cotangents, retain_graph=True)
    for a, b in zip((*slow, *grads_slow), (*fast, *grads_fast)):
        assert torch.equal(a, b)
    # Only some outputs differentiated: the others' cotangents count as zeros on both paths,
    # and an op none of whose outputs is differentiated gives its inputs None, not zeros (an
    # optimizer with momentum or weight decay treats the two differently).
    for used in ((5,), (0,), (2,), (1, 4), (3, 4)):
        fast = mmfast.ops.gaussian_terms((leaf["mu_s"], leaf["logvar_s"]), leaf["eps_s"],
                                         (leaf["mu_f"], leaf["logvar_f"]), leaf["eps_f"],
                                         prior=None if prior[0] is None else prior, stl=stl)
        got = torch.autograd.grad([fast[i].sum() for i in used], wrt, allow_unused=True)
        want = torch.autograd.grad([slow[i].sum() for i in used], wrt, allow_unused=True,
                                   retain_graph=True)
        for name, a, b in zip(leaf, got, want):
            assert (a is None) == (b is None), (used, name)
            assert a is None or torch.equal(a, b), (used, name)


def test_gaussian_terms_uses_the_two_ops_where_they_must_be_seen():
    from test_ops_objective import make_inputs
    leaf = make_inputs(2, 3, None, 4, torch.Generator().manual_seed(5), dtype=torch.float32)
    with mmfast.use_backend("reference"), FlopCounterMode(display=False):
        out = mmfast.ops.gaussian_terms((leaf["mu_s"], leaf["logvar_s"]), leaf["eps_s"],
                                        (leaf["mu_f"], leaf["logvar_f"]), leaf["eps_f"])
    assert type(out.z_s.grad_fn).__name__ != "_BothTermsBackward"
    assert type(out.z_full.grad_fn).__name__ != "_BothTermsBackward"
