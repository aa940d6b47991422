"""mmfast: Triton-accelerated multi-modal VAEs (Hirt et al., TMLR 2024).

Permutation-invariant aggregation of modality encodings and the masked variational objective,
with fused kernels behind :mod:`mmfast.ops`.
"""
import os as _os

from mmfast._source_tree import register_source_kernels as _register_source_kernels

_register_source_kernels(_os.path.dirname(_os.path.abspath(__file__)))

from mmfast import ops, subsets  # noqa: E402
from mmfast.backend import current_backend, use_backend  # noqa: E402
from mmfast import distributions, nn, priors  # noqa: E402
from mmfast.model import Modality, MultiModalVAE  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "subsets", "use_backend", "current_backend", "__version__", "distributions",
           "nn", "priors", "Modality", "MultiModalVAE"]
