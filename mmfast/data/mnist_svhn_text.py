"""MNIST-SVHN-Text (METHOD.md, experiment 3), built from the original MNIST and SVHN files.

Each MNIST image is paired with ``num_pairings`` (default 20) SVHN images of the same digit; the
text modality is the digit's English word written at a random offset into an 8-character string
of spaces, stored as int64 indices into :data:`ALPHABET` (one-hot is the encoder's business).
The pairings and offsets are drawn with an explicit seed and cached in ``root`` as
``mnist_svhn_text_<split>_k<pairings>_seed<seed>.pt`` (loaded with ``weights_only=True``).

Files looked for in ``root`` (gzipped or not for MNIST): ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (IDX) and
``train_32x32.mat``, ``test_32x32.mat`` (SVHN, MATLAB level 5; label 10 means digit 0).

Batches: ``x = {"mnist": float [B, 1, 28, 28], "svhn": float [B, 3, 32, 32]`` (both in [0, 1]),
``"text": int64 [B, 8]}``, every modality observed, and ``"label"`` int64 ``[B]``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmfast.data.base import MultiModalDataset
from mmfast.data.download import MNIST_RESOURCES, SVHN_RESOURCES, Resource, download_resources
from mmfast.data.formats import read_idx, read_mat

ALPHABET = " abcdefghijklmnopqrstuvwxyz"
TEXT_LENGTH = 8
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_MNIST_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def encode_text(words: list[str]) -> Tensor:
    """Strings of length <= 8 over :data:`ALPHABET` -> int64 ``[N, 8]`` (space-padded)."""
    out = torch.zeros(len(words), TEXT_LENGTH, dtype=torch.int64)
    for i, word in enumerate(words):
        out[i, :len(word)] = torch.tensor([ALPHABET.index(c) for c in word])
    return out


def decode_text(indices: Tensor) -> list[str]:
    """int64 ``[N, 8]`` -> strings (inverse of :func:`encode_text`, trailing spaces kept)."""
    return ["".join(ALPHABET[int(i)] for i in row) for row in indices]


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def _pairings(mnist_labels: Tensor, svhn_labels: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """``k`` label-matched SVHN partners per MNIST image: ``(mnist_index, svhn_index)`` ``[k N]``.

    Round r pairs a fresh permutation of each digit's MNIST images with a fresh permutation of
    that digit's SVHN images (cycled when there are fewer), so every SVHN image is used about
    equally often and an MNIST image gets ``k`` partners, distinct while its digit has ``>= k``.
    """
    gen = torch.Generator().manual_seed(seed)
    m_parts, s_parts = [], []
    for digit in range(10):
        m_idx = torch.nonzero(mnist_labels == digit).flatten()
        s_idx = torch.nonzero(svhn_labels == digit).flatten()
        if len(m_idx) == 0:
            continue
        if len(s_idx) == 0:
            raise ValueError(f"MNISTSVHNText: no SVHN image of digit {digit} to pair with "
                             f"{len(m_idx)} MNIST images")
        for _ in range(k):
            m_perm = m_idx[torch.randperm(len(m_idx), generator=gen)]
            reps = -(-len(m_idx) // len(s_idx))
            s_perm = torch.cat([s_idx[torch.randperm(len(s_idx), generator=gen)] for _ in range(reps)])
            m_parts.append(m_perm)
            s_parts.append(s_perm[:len(m_idx)])
    return torch.cat(m_parts), torch.cat(s_parts)


class MNISTSVHNText(MultiModalDataset):
    """The MNIST-SVHN-Text data set (see the module doc).

    Args:
        root: folder with the original files (and where the pairing cache goes).
        split: "train" or "test".
        download: fetch missing originals (resumable, checksum-verified) before loading.
        num_pairings: SVHN partners per MNIST image. seed: seeds pairings and text offsets.
        resources: override the files to fetch (list of :class:`Resource`), e.g. a mirror.
    """

    modality_names = ("mnist", "svhn", "text")

    def __init__(self, root: str | os.PathLike, split: str = "train", download: bool = False,
                 num_pairings: int = 20, seed: int = 0, resources: list[Resource] | None = None,
                 quiet: bool = False):
        if split not in _MNIST_STEMS:
            raise ValueError(f"MNISTSVHNText: split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        self.root, self.split, self.num_pairings, self.seed = root, split, num_pairings, seed
        if download:
            resources = resources if resources is not None else MNIST_RESOURCES[split] + SVHN_RESOURCES[split]
            missing = [r for r in resources if _find(root, r.filename.removesuffix(".gz")) is None]
            download_resources(root, missing, quiet=quiet)
        stems = [*_MNIST_STEMS[split], _SVHN_FILES[split]]
        found = {stem: _find(root, stem) for stem in stems}
        lacking = [stem for stem, path in found.items() if path is None]
        if lacking:
            raise FileNotFoundError(f"MNISTSVHNText: {root} lacks {', '.join(lacking)} (MNIST IDX, "
                                    f"gzipped or not; SVHN .mat); pass download=True to fetch them")
        images = read_idx(found[stems[0]])
        labels = read_idx(found[stems[1]])
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(f"MNISTSVHNText: MNIST images {images.shape} / labels {labels.shape}; "
                             f"expected [N, 28, 28] / [N]")
        svhn = read_mat(found[stems[2]])
        if "X" not in svhn or "y" not in svhn:
            raise ValueError(f"MNISTSVHNText: {found[stems[2]]} lacks the arrays X and y")
        X, y = svhn["X"], svhn["y"].reshape(-1)
        if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.shape[3] != y.shape[0]:
            raise ValueError(f"MNISTSVHNText: SVHN X {X.shape} / y {y.shape}; expected [32, 32, 3, N] / [N]")
        self.mnist_images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        self.mnist_labels = torch.from_numpy(labels.astype(np.int64))
        self.svhn_images = torch.from_numpy(np.ascontiguousarray(X.transpose(3, 2, 0, 1), dtype=np.uint8))
        self.svhn_labels = torch.from_numpy(y.astype(np.int64)) % 10   # SVHN stores 0 as 10
        self._load_or_make_pairs()

    @property
    def cache_path(self) -> Path:
        return self.root / f"mnist_svhn_text_{self.split}_k{self.num_pairings}_seed{self.seed}.pt"

    def _load_or_make_pairs(self) -> None:
        path, n_m, n_s = self.cache_path, len(self.mnist_labels), len(self.svhn_labels)
        cache = None
        if path.exists():
            cache = torch.load(path, weights_only=True)
            if cache.get("num_mnist") != n_m or cache.get("num_svhn") != n_s:
                cache = None  # built from other files: rebuild
        if cache is None:
            m_index, s_index = _pairings(self.mnist_labels, self.svhn_labels, self.num_pairings, self.seed)
            gen = torch.Generator().manual_seed(self.seed + 1)
            lengths = torch.tensor([len(w) for w in DIGIT_WORDS])[self.mnist_labels[m_index]]
            offsets = (torch.rand(len(m_index), generator=gen) * (TEXT_LENGTH - lengths + 1)).long()
            cache = {"mnist_index": m_index, "svhn_index": s_index, "text_offset": offsets,
                     "num_mnist": n_m, "num_svhn": n_s, "seed": self.seed}
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            torch.save(cache, tmp)
            os.replace(tmp, path)
        self.mnist_index, self.svhn_index = cache["mnist_index"], cache["svhn_index"]
        self.text_offset = cache["text_offset"]
        self.labels = self.mnist_labels[self.mnist_index]
        words = encode_text(list(DIGIT_WORDS))                                     # [10, 8]
        # Shift each word right by its offset: position p holds word[p - offset] (space outside).
        pos = torch.arange(TEXT_LENGTH)
        src = pos - self.text_offset[:, None]
        valid = (src >= 0) & (src < TEXT_LENGTH)
        self.text = torch.where(valid, words[self.labels[:, None], src.clamp(0, TEXT_LENGTH - 1)], 0)

    def __len__(self) -> int:
        return len(self.mnist_index)

    def batch(self, index: Tensor) -> dict:
        mnist = self.mnist_images[self.mnist_index[index]].unsqueeze(1).float() / 255.0
        svhn = self.svhn_images[self.svhn_index[index]].float() / 255.0
        return {"x": {"mnist": mnist, "svhn": svhn, "text": self.text[index]},
                "observed": torch.ones(len(index), 3, dtype=torch.bool),
                "label": self.labels[index]}
