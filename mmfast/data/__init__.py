"""Data for the paper's experiments: batches gathered by index (see :mod:`mmfast.data.base`).

* :class:`LinearGaussian`: the linear Gaussian model with its exact marginals and posteriors.
* :class:`IdentifiableBimodal`, :class:`IdentifiableMultimodal`: the nonlinear identifiable
  simulations, true latents kept for MCC.
* :class:`MNISTSVHNText`: from the original MNIST and SVHN files, with resumable downloads.
"""
from mmfast.data.base import MultiModalData, MultiModalDataset, batch_to, iterate_batches
from mmfast.data.download import ChecksumError, DownloadError, Resource, download_file
from mmfast.data.identifiable import IdentifiableBimodal, IdentifiableMultimodal
from mmfast.data.linear_gaussian import (LinearGaussian, gaussian_kl_to_full,
                                         linear_gaussian_log_marginal, linear_gaussian_posterior)
from mmfast.data.mnist_svhn_text import ALPHABET, MNISTSVHNText, decode_text, encode_text

__all__ = ["MultiModalData", "MultiModalDataset", "batch_to", "iterate_batches", "LinearGaussian",
           "linear_gaussian_posterior", "linear_gaussian_log_marginal", "gaussian_kl_to_full",
           "IdentifiableBimodal", "IdentifiableMultimodal", "MNISTSVHNText", "ALPHABET",
           "encode_text", "decode_text", "Resource", "download_file", "DownloadError",
           "ChecksumError"]
