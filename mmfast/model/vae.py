"""MultiModalVAE: per-modality encoders, a permutation-invariant aggregator, per-modality
decoders, a prior; the masked and mixture objectives, the IWAE log-likelihood, cross-modal
reconstruction and unconditional sampling (METHOD.md, DESIGN.md "Model layer")."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from mmfast import ops
from mmfast.distributions import DiagGaussian
from mmfast.model.modality import Modality
from mmfast.priors import GaussianMixture, StandardNormal
from mmfast.subsets import sample_subsets

__all__ = ["MultiModalVAE", "ObjectiveOutput"]

KINDS = ("masked", "mixture")


@dataclass
class ObjectiveOutput:
    """Result of :meth:`MultiModalVAE.objective`. ``*batch`` is ``[B]``, or ``[B, S]`` for a
    ``[B, S, M]`` subset bank.

    value: ``[*batch]`` per-sample estimate in log-likelihood units (higher is better).
    loss: scalar ``-value.mean()`` (a mean over the batch, and over the subsets of a bank).
    terms: named ``[*batch]`` parts, each averaged over the K samples: ``rec_subset``
        (Σ_{m∈S} log p(x_m|z_S)), ``rec_rest`` (Σ_{m∉S observed} log p(x_m|z), from the full
        sample z for the masked objective and from z_S for the mixture one), ``kl_subset``
        (log q(z_S|x_S) − log p(z_S)), ``kl_rest`` (masked: log q(z|x) − log q(z|x_S)),
        the raw log-densities ``log_q_subset``, ``log_p_subset``, ``log_q_full``,
        ``log_q_full_given_subset`` (masked only), and ``rec/<modality>`` per modality.
    log_weights: ``[K, *batch]`` the importance weights w_k of METHOD.md.
    z_subset: ``[K, *batch, d]`` samples of q(z|x_S); z_full: ``[K, B, d]`` samples of q(z|x)
        (masked objective) or None.
    """
    value: Tensor
    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    log_weights: Tensor | None = None
    z_subset: Tensor | None = None
    z_full: Tensor | None = None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class MultiModalVAE(nn.Module):
    """A multi-modal VAE ``p(z) Π_m p(x_m | z)`` with encoders for every subset of modalities.

    Args:
        modalities: ``{name: Modality}``; their order is the order of every mask's columns.
        aggregator: ``nn.Module``, ``forward(features [B, M, E], mask [B, M] or [B, S, M]) ->``
            posterior (``DiagGaussian`` or a mixture with ``rsample``, ``log_prob``, ``mean``).
        prior: ``mmfast.priors.StandardNormal(d)``, ``GaussianMixture(d, components)``, or any
            module with ``latent_dim``, ``log_prob(z)`` and ``sample(n)``.

    Data: ``x`` is a dict ``{name: [B, ...]}``; ``observed`` bool ``[B, M]`` (default: the
    modalities present in ``x``) marks which modalities each sample has. The values of a
    missing modality are replaced by zeros with ``torch.where`` before anything reads them, so
    NaN there reaches neither results nor gradients; a modality missing from every sample may
    be left out of ``x``.
    """

    def __init__(self, modalities: Mapping[str, Modality], aggregator: nn.Module, prior: nn.Module):
        super().__init__()
        if not isinstance(modalities, Mapping) or not modalities:
            raise ValueError("MultiModalVAE: modalities must be a non-empty dict {name: Modality}")
        for name, modality in modalities.items():
            if not isinstance(modality, Modality):
                raise TypeError(f"MultiModalVAE: modality {name!r} is a {type(modality).__name__}; "
                                "expected mmfast.Modality")
        if not hasattr(prior, "latent_dim"):
            raise TypeError("MultiModalVAE: prior needs a latent_dim attribute")
        self.modalities = nn.ModuleDict(dict(modalities))
        self.aggregator = aggregator
        self.prior = prior

    @property
    def names(self) -> list[str]:
        return list(self.modalities.keys())

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    # ------------------------------------------------------------------ inputs
    def _prepare(self, x: Mapping[str, Tensor], observed: Tensor | None):
        """Validate ``x`` and ``observed``; zero the values of missing modalities.
        Returns ``(B, observed [B, M], {name: safe x_m})``."""
        if not isinstance(x, Mapping):
            raise TypeError(f"MultiModalVAE: x must be a dict {{name: tensor}}, got {type(x).__name__}")
        unknown = [k for k in x if k not in self.modalities]
        if unknown:
            raise ValueError(f"MultiModalVAE: x has unknown modalities {unknown}; the model has {self.names}")
        present = [n for n in self.names if n in x]
        if not present:
            raise ValueError(f"MultiModalVAE: x holds none of the modalities {self.names}")
        B, device = x[present[0]].shape[0], x[present[0]].device
        for n in present:
            if not isinstance(x[n], Tensor) or x[n].dim() < 1 or x[n].shape[0] != B:
                shape = list(x[n].shape) if isinstance(x[n], Tensor) else type(x[n]).__name__
                raise ValueError(f"MultiModalVAE: x[{n!r}] has shape {shape}; expected [{B}, ...] "
                                 f"like x[{present[0]!r}]")
        M = self.num_modalities
        has = torch.tensor([n in x for n in self.names], device=device)
        if observed is None:
            observed = has.expand(B, M)
        else:
            if not isinstance(observed, Tensor) or observed.dtype != torch.bool:
                raise TypeError("MultiModalVAE: observed must be a bool tensor [B, M]")
            if observed.dim() == 1:
                observed = observed.expand(B, -1)
            if tuple(observed.shape) != (B, M):
                raise ValueError(f"MultiModalVAE: observed has shape {list(observed.shape)}; "
                                 f"expected [{B}, {M}] (columns {self.names})")
            observed = observed.to(device)
            for m, n in enumerate(self.names):
                if n not in x and bool(observed[:, m].any()):
                    raise ValueError(f"MultiModalVAE: modality {n!r} is marked observed but x has no {n!r}")
        safe = {}
        for m, n in enumerate(self.names):
            if n in x:
                t = x[n]
                keep = observed[:, m].reshape(B, *([1] * (t.dim() - 1)))
                safe[n] = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
        return B, observed, safe

    def _encode(self, safe: Mapping[str, Tensor]) -> Tensor:
        """``[B, M, E]`` features, one encoder pass per modality (zeros for an absent one)."""
        feats = {n: self.modalities[n].encode(safe[n]) for n in self.names if n in safe}
        like = next(iter(feats.values()))
        for n, h in feats.items():
            if h.shape != like.shape:
                raise ValueError(f"MultiModalVAE: encoder of {n!r} gave {list(h.shape)}; all encoders "
                                 f"must give [B, E] = {list(like.shape)}")
        return torch.stack([feats.get(n, torch.zeros_like(like)) for n in self.names], dim=1)

    def _check_mask(self, name: str, mask, B: int, device) -> Tensor:
        M = self.num_modalities
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"MultiModalVAE: {name} must be a bool tensor [B, M] or [B, S, M]")
        if mask.dim() == 1:
            mask = mask.expand(B, -1)
        if mask.dim() not in (2, 3) or mask.shape[0] != B or mask.shape[-1] != M:
            raise ValueError(f"MultiModalVAE: {name} has shape {list(mask.shape)}; expected "
                             f"[{B}, {M}] or [{B}, S, {M}] (columns {self.names})")
        return mask.to(device)

    def _given_mask(self, given, B: int, device) -> Tensor:
        if isinstance(given, str):
            given = [given]
        if not isinstance(given, Tensor):
            names = list(given)
            bad = [n for n in names if n not in self.modalities]
            if bad:
                raise ValueError(f"MultiModalVAE: unknown modalities {bad}; the model has {self.names}")
            given = torch.tensor([n in names for n in self.names], device=device)
        return self._check_mask("given", given, B, device)

    # ------------------------------------------------------------------ pieces
    def _fast(self, *posteriors) -> bool:
        return (all(type(q) is DiagGaussian for q in posteriors)
                and isinstance(self.prior, (StandardNormal, GaussianMixture)))

    def _prior_args(self):
        return self.prior.fused_args()

    def _log_lik(self, name: str, x_m: Tensor | None, parts: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """``log p(x_m | z)`` at the rows that need it, one decoder call for all parts.

        Each part is ``(z [K, B, (S,) d], need bool [B, (S)])``; returns per part ``[K, B, (S)]``
        holding the log-likelihood where ``need`` and exactly 0 elsewhere. The decoder runs only
        on the needed rows (the row selection costs one device synchronisation).
        """
        K = parts[0][0].shape[0]
        acc = _acc(parts[0][0].dtype)
        flats, zs, xs, sizes = [], [], [], []
        for z, need in parts:
            flat_need = need.reshape(-1)
            per_row = flat_need.numel() // need.shape[0]
            index = flat_need.nonzero().squeeze(1)
            flats.append((flat_need.numel(), index, need.shape))
            sizes.append(index.numel())
            if index.numel():
                zs.append(z.reshape(K, -1, z.shape[-1]).index_select(1, index))
                xs.append(x_m.index_select(0, index // per_row))
        results = []
        ll = None
        if zs:
            ll = self.modalities[name].log_prob(torch.cat(zs, 1), torch.cat(xs, 0)).to(acc)
        start = 0
        for (total, index, shape), n in zip(flats, sizes):
            out = torch.zeros(K, total, dtype=acc, device=index.device)
            if n:
                out = out.index_copy(1, index, ll[:, start:start + n])
                start += n
            results.append(out.reshape(K, *shape))
        return results

    def posterior(self, x: Mapping[str, Tensor], given=None):
        """``q(z | x_given)``. ``given``: bool ``[B, M]`` or ``[M]``, modality names, a
        ``[B, S, M]`` bank, or None (every modality present in x). Modalities outside
        ``given`` are never read. Batch ``[B]`` (``[B, S]`` for a bank)."""
        if given is None:
            _, observed, safe = self._prepare(x, None)
            return self.aggregator(self._encode(safe), observed)
        present = [t for t in x.values() if isinstance(t, Tensor)] if isinstance(x, Mapping) else []
        if not present:
            raise ValueError(f"MultiModalVAE: x must be a dict holding some of {self.names}")
        mask = self._given_mask(given, present[0].shape[0], present[0].device)
        _, observed, safe = self._prepare(x, mask.any(1) if mask.dim() == 3 else mask)
        return self.aggregator(self._encode(safe), mask)

    # ------------------------------------------------------------------ objective
    def objective(self, x: Mapping[str, Tensor], observed: Tensor | None = None,
                  subset: Tensor | None = None, kind: str = "masked", num_samples: int = 1,
                  beta: float = 1.0, stl: bool = True) -> ObjectiveOutput:
        """The masked (default) or mixture objective of METHOD.md, per sample.

        Args:
            x: ``{name: [B, ...]}``.
            observed: bool ``[B, M]``, the modalities each sample has (default: all in x).
            subset: bool ``[B, M]`` (one S per sample) or ``[B, S, M]`` (a bank per sample, e.g.
                ``mf.subsets.all_subsets(M).expand(B, -1, -1)``); restricted to the observed
                modalities. Default: one draw of ``mf.subsets.sample_subsets(observed)``.
            kind: ``"masked"`` or ``"mixture"``.
            num_samples: K importance samples; value = logsumexp_k w_k − log K.
            beta: weight of the rate terms.
            stl: sticking the landing: log q(z_S|x_S) and log q(z|x) see detached parameters;
                log q(z|x_S) at the full sample and log p(z) do not. With a mixture posterior
                (MoE, *Mixture aggregators) the sample is reparameterised given its component,
                so the mixture weights learn only through the log-densities that are not
                detached (see :class:`mmfast.distributions.DiagGaussianMixture`).
        Returns:
            :class:`ObjectiveOutput` (value ``[B]`` or ``[B, S]``).
        """
        if kind not in KINDS:
            raise ValueError(f"objective: kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"objective: num_samples must be a positive int, got {num_samples!r}")
        B, observed, safe = self._prepare(x, observed)
        if subset is None:
            subset = sample_subsets(observed)
        else:
            subset = self._check_mask("subset", subset, B, observed.device)
        bank = subset.dim() == 3
        subset3 = (subset if bank else subset.unsqueeze(1)) & observed.unsqueeze(1)   # [B, S, M]
        S = subset3.shape[1]
        features = self._encode(safe)
        K = num_samples
        masked = kind == "masked"
        if masked:
            # One aggregator call for the subsets and the full set: its subset-independent
            # parts (χ, token MLPs, projections) run once.
            both = self.aggregator(features, torch.cat([subset3, observed.unsqueeze(1)], 1))
            q_s, q_f = both[:, :S], both[:, S]
        else:
            q_s, q_f = self.aggregator(features, subset3), None

        t = self._latent_terms(q_s, q_f, K, stl)
        z_s, log_q_s, log_p_s, z, log_q_f, log_q_fs = t        # [K, B, S(, d)] / [K, B(, d)]

        rest = observed.unsqueeze(1) & ~subset3                                          # [B, S, M]
        acc = log_q_s.dtype
        rec_s = torch.zeros(K, B, S, dtype=acc, device=observed.device)
        rec_r = torch.zeros_like(rec_s)
        terms: dict[str, Tensor] = {}
        for m, name in enumerate(self.names):
            x_m = safe.get(name)
            in_s, in_rest = subset3[..., m], rest[..., m]
            if masked:
                ll_s, ll_f = self._log_lik(name, x_m, [(z_s, in_s), (z, in_rest.any(1))])
                ll_r = torch.where(in_rest, ll_f.unsqueeze(-1), 0.0)
            else:
                (ll,) = self._log_lik(name, x_m, [(z_s, in_s | in_rest)])
                ll_s, ll_r = torch.where(in_s, ll, 0.0), torch.where(in_rest, ll, 0.0)
            rec_s, rec_r = rec_s + ll_s, rec_r + ll_r
            terms[f"rec/{name}"] = (ll_s + ll_r).mean(0)

        w = rec_s + rec_r + beta * (log_p_s - log_q_s)
        terms.update(rec_subset=rec_s.mean(0), rec_rest=rec_r.mean(0),
                     kl_subset=(log_q_s - log_p_s).mean(0), log_q_subset=log_q_s.mean(0),
                     log_p_subset=log_p_s.mean(0))
        if masked:
            log_q_f = log_q_f.unsqueeze(-1)
            w = w + beta * (log_q_fs - log_q_f)
            terms.update(kl_rest=(log_q_f - log_q_fs).mean(0), log_q_full=log_q_f.mean(0),
                         log_q_full_given_subset=log_q_fs.mean(0))
        value = ops.importance_logsumexp(w)
        if not bank:
            value, w, z_s = value.squeeze(1), w.squeeze(2), z_s.squeeze(2)
            terms = {k: v.squeeze(1) for k, v in terms.items()}
        return ObjectiveOutput(value=value, loss=-value.mean(), terms=terms, log_weights=w,
                               z_subset=z_s, z_full=z)

    def _latent_terms(self, q_s, q_f, K: int, stl: bool):
        """Samples and latent log-densities, all with a subset axis: z_s ``[K, B, S, d]``,
        log_q_s / log_p_s ``[K, B, S]``; z ``[K, B, d]``, log_q_f ``[K, B]``, log_q_fs
        ``[K, B, S]`` (None for the mixture objective)."""
        if self._fast(q_s, *([q_f] if q_f is not None else [])):
            mu_s, logvar_s = q_s.mu.contiguous(), q_s.logvar.contiguous()
            eps_s = torch.randn(K, *mu_s.shape, dtype=mu_s.dtype, device=mu_s.device)
            full = eps_f = None
            if q_f is not None:
                full = (q_f.mu.contiguous(), q_f.logvar.contiguous())
                eps_f = torch.randn(K, *full[0].shape, dtype=mu_s.dtype, device=mu_s.device)
            t = ops.gaussian_terms((mu_s, logvar_s), eps_s, full, eps_f, prior=self._prior_args(), stl=stl)
            return t.z_s, t.log_q_s, t.log_p_s, t.z_full, t.log_q_full, t.log_q_full_given_s
        z_s = q_s.rsample(K)
        log_q_s = (q_s.detach() if stl else q_s).log_prob(z_s)
        log_p_s = self.prior.log_prob(z_s).to(log_q_s.dtype)
        if q_f is None:
            return z_s, log_q_s, log_p_s, None, None, None
        z = q_f.rsample(K)
        log_q_f = (q_f.detach() if stl else q_f).log_prob(z)
        log_q_fs = q_s.log_prob(z.unsqueeze(2))
        return z_s, log_q_s, log_p_s, z, log_q_f, log_q_fs

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def log_likelihood(self, x: Mapping[str, Tensor], observed: Tensor | None = None,
                       num_samples: int = 1000, chunk_size: int | None = None,
                       max_rows: int = 8192) -> Tensor:
        """IWAE estimate of ``log p(x_observed)`` per sample, with proposal q(z | x_observed):
        ``logsumexp_k[Σ_{m obs} log p(x_m|z_k) + log p(z_k) − log q(z_k|x_obs)] − log K``.

        Joint: all modalities observed; marginal of S: ``observed`` = S. The K samples are
        processed ``chunk_size`` at a time (default: as many as keep ``K_chunk · B`` under
        ``max_rows`` decoded rows) with a running log-sum-exp, so memory does not grow with K.
        Runs without gradients. Returns ``[B]``.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"log_likelihood: num_samples must be a positive int, got {num_samples!r}")
        B, observed, safe = self._prepare(x, observed)
        q = self.aggregator(self._encode(safe), observed)
        chunk = chunk_size or max(1, min(num_samples, max_rows // max(B, 1)))
        total = None
        for start in range(0, num_samples, chunk):
            k = min(chunk, num_samples - start)
            z, log_q, log_p = self._proposal_terms(q, k)
            w = log_p - log_q
            for m, name in enumerate(self.names):
                if name in safe:
                    w = w + self._log_lik(name, safe[name], [(z, observed[:, m])])[0]
            # The chunk's logsumexp_k w_k (the op returns it less log k) through the fused op.
            lse = ops.importance_logsumexp(w) + math.log(k)
            total = lse if total is None else torch.logaddexp(total, lse)
        return total - math.log(num_samples)

    def _proposal_terms(self, q, K: int):
        """``z [K, B, d]``, ``log q(z) [K, B]``, ``log p(z) [K, B]`` for a ``[B]`` posterior."""
        if self._fast(q):
            mu, logvar = q.mu.contiguous(), q.logvar.contiguous()
            eps = torch.randn(K, *mu.shape, dtype=mu.dtype, device=mu.device)
            t = ops.gaussian_terms((mu, logvar), eps, prior=self._prior_args(), stl=False)
            return t.z_s, t.log_q_s, t.log_p_s
        z = q.rsample(K)
        log_q = q.log_prob(z)
        return z, log_q, self.prior.log_prob(z).to(log_q.dtype)

    @torch.no_grad()
    def reconstruct(self, x: Mapping[str, Tensor], given, use_mean: bool = False) -> dict[str, Tensor]:
        """Decoded means of every modality from ``z ~ q(z | x_given)`` (one draw per sample; the
        posterior mean with ``use_mean=True``): cross-modal prediction when ``given`` leaves
        modalities out. ``given``: bool ``[B, M]`` or ``[M]``, or modality names. Values of
        modalities outside ``given`` are never read. Returns ``{name: [B, *event]}``
        (categorical: class probabilities ``[B, *event, C]``)."""
        q = self.posterior(x, given)
        z = q.mean if use_mean else q.rsample(1)[0]
        return {n: self.modalities[n].mean(z) for n in self.names}

    @torch.no_grad()
    def sample(self, n: int, return_latents: bool = False):
        """Unconditional samples: ``z ~ p(z)`` (``[n, d]``), decoded to the mean of every
        p(x_m | z). Returns ``{name: [n, *event]}`` (and z with ``return_latents``)."""
        z = self.prior.sample(n)
        out = {name: self.modalities[name].mean(z) for name in self.names}
        return (out, z) if return_latents else out
