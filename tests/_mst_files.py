"""Tiny MNIST / SVHN files in the real formats, written byte by byte for the data tests.

The IDX files are assembled here with ``struct`` (not with mmfast's writer) so that the reader
is checked against the format itself.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from mmfast.data.formats import write_mat


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(struct.pack(">i", s) for s in array.shape)
    return header + array.tobytes()


def make_mnist_svhn(root: Path, n_mnist=(30, 20), n_svhn=(25, 15), seed=0, gz=True) -> dict:
    """Write train/test MNIST IDX (gzipped when ``gz``) and SVHN .mat files into ``root``.

    Returns the arrays written: ``{split: (mnist_images, mnist_labels, svhn_X, svhn_y)}``.
    Every digit appears in both data sets of each split (labels cycle 0..9; SVHN 0 -> 10).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, nm, ns, prefix, mat in (("train", n_mnist[0], n_svhn[0], "train", "train_32x32.mat"),
                                       ("test", n_mnist[1], n_svhn[1], "t10k", "test_32x32.mat")):
        images = rng.integers(0, 256, size=(nm, 28, 28), dtype=np.uint8)
        labels = (np.arange(nm) % 10).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(arr)
            if gz:
                (root / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
        X = rng.integers(0, 256, size=(32, 32, 3, ns), dtype=np.uint8)
        digits = np.arange(ns) % 10
        y = np.where(digits == 0, 10, digits).astype(np.float64).reshape(-1, 1)
        write_mat(root / mat, {"X": X, "y": y})
        written[split] = (images, labels, X, y)
    return written
