"""MNIST-SVHN-Text from tiny files in the real formats: readers, pairings, text, the cache."""
import gzip
import struct
import zlib

import numpy as np
import pytest
import torch

from _mst_files import idx_bytes, make_mnist_svhn
from mmfast.data import MNISTSVHNText, decode_text
from mmfast.data.formats import read_idx, read_mat, write_idx, write_mat

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def test_read_idx_plain_and_gzipped(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(idx_bytes(arr))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)
    write_idx(tmp_path / "b.gz", arr)
    assert gzip.decompress((tmp_path / "b.gz").read_bytes()) == idx_bytes(arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(arr)[:-1])
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx(tmp_path / "short")


def _element(mtype, payload):
    return struct.pack("<II", mtype, len(payload)) + payload + b"\0" * ((-len(payload)) % 8)


def test_read_mat_hand_built_like_matlab(tmp_path):
    """A double array stored as uint8 (as MATLAB does), a small-element name, compressed."""
    y = np.array([[1.0], [10.0], [3.0]])
    matrix = (_element(6, struct.pack("<II", 6, 0))                # class mxDOUBLE
              + _element(5, struct.pack("<2i", 3, 1))              # dims 3 x 1
              + struct.pack("<HH", 1, 1) + b"y\0\0\0"              # small element: 1 byte name
              + _element(2, bytes([1, 10, 3])))                    # data as miUINT8
    X = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2)
    matrix_x = (_element(6, struct.pack("<II", 9, 0)) + _element(5, struct.pack("<3i", 2, 3, 2))
                + struct.pack("<HH", 1, 1) + b"X\0\0\0" + _element(2, X.tobytes(order="F")))
    header = b"MATLAB 5.0 MAT-file".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x100) + b"IM"
    packed = zlib.compress(_element(14, matrix))
    body = struct.pack("<II", 15, len(packed)) + packed + _element(14, matrix_x)
    (tmp_path / "h.mat").write_bytes(header + body)
    out = read_mat(tmp_path / "h.mat")
    assert out["y"].dtype == np.float64
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["X"], X)


def test_write_mat_round_trip_and_scipy_if_present(tmp_path):
    X = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    y = np.array([[10.0], [1.0], [2.0], [3.0]])
    write_mat(tmp_path / "s.mat", {"X": X, "y": y})
    out = read_mat(tmp_path / "s.mat")
    np.testing.assert_array_equal(out["X"], X)
    np.testing.assert_array_equal(out["y"], y)
    try:
        import scipy.io
    except ImportError:
        return
    ref = scipy.io.loadmat(tmp_path / "s.mat")
    np.testing.assert_array_equal(ref["X"], X)
    scipy.io.savemat(tmp_path / "t.mat", {"X": X, "y": y}, do_compression=True)
    np.testing.assert_array_equal(read_mat(tmp_path / "t.mat")["X"], X)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mst")
    return root, make_mnist_svhn(root, gz=True)


def test_pairs_labels_text_and_pixels(files):
    root, written = files
    images, labels, X, y = written["train"]
    data = MNISTSVHNText(root, "train", num_pairings=20, seed=0)
    assert len(data) == 20 * len(labels)
    assert data.modality_names == ("mnist", "svhn", "text")
    b = data.batch(torch.arange(len(data)))
    assert b["x"]["mnist"].shape == (len(data), 1, 28, 28) and b["x"]["svhn"].shape == (len(data), 3, 32, 32)
    assert b["observed"].all()
    svhn_digit = (y.reshape(-1) % 10).astype(np.int64)
    for i in range(0, len(data), 7):
        mi, si = int(data.mnist_index[i]), int(data.svhn_index[i])
        digit = int(labels[mi])
        assert int(b["label"][i]) == digit == svhn_digit[si]
        np.testing.assert_allclose(b["x"]["mnist"][i, 0].numpy(), images[mi] / 255.0, rtol=1e-6)
        for c in range(3):
            np.testing.assert_allclose(b["x"]["svhn"][i, c].numpy(), X[:, :, c, si] / 255.0, rtol=1e-6)
        text = decode_text(b["x"]["text"][i:i + 1])[0]
        assert len(text) == 8 and text.strip() == WORDS[digit]
        assert text == " " * text.index(WORDS[digit]) + WORDS[digit] + " " * (8 - len(WORDS[digit]) - text.index(WORDS[digit]))
    # 20 partners for every MNIST image; SVHN images of a digit used about equally often.
    assert torch.equal(torch.bincount(data.mnist_index, minlength=len(labels)),
                       torch.full((len(labels),), 20))
    counts = torch.bincount(data.svhn_index, minlength=X.shape[3])
    for digit in range(10):
        sel = torch.from_numpy(svhn_digit == digit)
        assert counts[sel].max() - counts[sel].min() <= 20
    # offsets vary
    assert len(set(data.text_offset.tolist())) > 1


def test_pairing_cache_and_seed(files):
    root, _ = files
    a = MNISTSVHNText(root, "test", seed=4)
    assert a.cache_path.exists()
    b = MNISTSVHNText(root, "test", seed=4)
    assert torch.equal(a.svhn_index, b.svhn_index) and torch.equal(a.text, b.text)
    cached = torch.load(a.cache_path, weights_only=True)
    assert torch.equal(cached["svhn_index"], a.svhn_index)
    c = MNISTSVHNText(root, "test", seed=5)
    assert not torch.equal(a.svhn_index, c.svhn_index)


def test_ungzipped_files_and_missing_files(tmp_path):
    make_mnist_svhn(tmp_path / "raw", gz=False)
    data = MNISTSVHNText(tmp_path / "raw", "test", num_pairings=2)
    assert len(data) == 2 * 20
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="download=True"):
        MNISTSVHNText(tmp_path / "empty", "train")
