"""The model layer: :class:`Modality` and :class:`MultiModalVAE` (DESIGN.md "Model layer")."""
from mmfast.model.modality import LIKELIHOODS, Modality
from mmfast.model.vae import MultiModalVAE, ObjectiveOutput

__all__ = ["Modality", "MultiModalVAE", "ObjectiveOutput", "LIKELIHOODS"]
