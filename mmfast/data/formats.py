"""Readers (and small writers, for tests and fixtures) of the original MNIST and SVHN formats.

* IDX (MNIST): magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian int32 sizes,
  then the data, big-endian, C order. Gzipped files (``.gz``) are read transparently.
* MATLAB level-5 MAT-files (SVHN ``*_32x32.mat``): a 128-byte header, then tagged data elements,
  possibly zlib-compressed (``miCOMPRESSED``); numeric ``miMATRIX`` arrays are stored in
  column-major order, in the smallest integer type that holds them, and are cast back to their
  MATLAB class. Only the numeric classes are read (SVHN holds nothing else); others are skipped.
  Version 7.3 files are HDF5 and are refused with a clear error.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def _open(path: str | os.PathLike):
    path = os.fspath(path)
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its stored shape."""
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{os.fspath(path)}: not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{os.fspath(path)}: IDX header says shape {list(shape)} "
                         f"({count * dtype.itemsize} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"write_idx: unsupported dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


# MAT-file level 5 data types and array classes.
_MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX = {6: np.float64, 7: np.float32, 8: np.int8, 9: np.uint8, 10: np.int16, 11: np.uint16,
       12: np.int32, 13: np.uint32, 14: np.int64, 15: np.uint64}
_MX_OF = {np.dtype(v): k for k, v in _MX.items()}
_MI_OF = {np.dtype(v): k for k, v in _MI.items()}


def _element(buf: bytes, pos: int, endian: str) -> tuple[int, bytes, int]:
    """Parse the data element at ``pos``: (type, payload, position of the next element)."""
    (first,) = struct.unpack_from(endian + "I", buf, pos)
    if first >> 16:  # small data element: size and type share 4 bytes, data in the next 4
        nbytes, mtype = first >> 16, first & 0xFFFF
        return mtype, buf[pos + 4:pos + 4 + nbytes], pos + 8
    mtype, nbytes = struct.unpack_from(endian + "II", buf, pos)
    start = pos + 8
    if start + nbytes > len(buf):
        raise ValueError(f"MAT-file truncated: an element of {nbytes} bytes at offset {pos} "
                         f"runs past the end ({len(buf)} bytes)")
    step = nbytes if mtype == _MI_COMPRESSED else (nbytes + 7) // 8 * 8
    return mtype, buf[start:start + nbytes], start + step


def _numeric(mtype: int, payload: bytes, endian: str) -> np.ndarray:
    if mtype not in _MI:
        raise ValueError(f"MAT-file: unsupported numeric data type {mtype}")
    return np.frombuffer(payload, dtype=np.dtype(_MI[mtype]).newbyteorder(endian))


def _matrix(payload: bytes, endian: str) -> tuple[str, np.ndarray | None]:
    pos = 0
    _, flags, pos = _element(payload, pos, endian)
    flags = _numeric(6, flags, endian)
    mx_class, complex_ = int(flags[0]) & 0xFF, bool(int(flags[0]) & 0x0800)
    _, dims, pos = _element(payload, pos, endian)
    dims = [int(v) for v in _numeric(5, dims, endian)]
    _, name, pos = _element(payload, pos, endian)
    name = name.decode("latin-1")
    if mx_class not in _MX or complex_:
        return name, None  # cells, structs, chars, sparse, complex: nothing SVHN needs
    mtype, real, pos = _element(payload, pos, endian)
    values = _numeric(mtype, real, endian).astype(_MX[mx_class])
    if values.size != int(np.prod(dims)):
        raise ValueError(f"MAT-file: array {name!r} has dims {dims} but {values.size} values")
    return name, values.reshape(dims, order="F")


def read_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the numeric arrays of a MATLAB level-5 MAT-file (e.g. SVHN's ``train_32x32.mat``)."""
    with open(path, "rb") as f:
        buf = f.read()
    where = os.fspath(path)
    if len(buf) < 128:
        raise ValueError(f"{where}: too short for a MAT-file ({len(buf)} bytes)")
    if buf[:19] == b"MATLAB 7.3 MAT-file" or buf[512:520] == b"\x89HDF\r\n\x1a\n":
        raise ValueError(f"{where}: a MATLAB v7.3 (HDF5) file; only level-5 MAT-files are read")
    indicator = buf[126:128]
    if indicator not in (b"IM", b"MI"):
        raise ValueError(f"{where}: not a level-5 MAT-file (endian indicator {indicator!r})")
    endian = "<" if indicator == b"IM" else ">"
    out: dict[str, np.ndarray] = {}
    pos = 128
    while pos + 8 <= len(buf):
        mtype, payload, pos = _element(buf, pos, endian)
        if mtype == _MI_COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error as exc:
                raise ValueError(f"{where}: corrupt compressed element ({exc})") from exc
            mtype, payload, _ = _element(payload, 0, endian)
        if mtype == _MI_MATRIX:
            name, array = _matrix(payload, endian)
            if array is not None:
                out[name] = array
    return out


def _tagged(mtype: int, payload: bytes) -> bytes:
    pad = (-len(payload)) % 8
    return struct.pack("<II", mtype, len(payload)) + payload + b"\0" * pad


def write_mat(path: str | os.PathLike, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    """Write numeric arrays as a little-endian MATLAB level-5 MAT-file (what SVHN ships)."""
    text = b"MATLAB 5.0 MAT-file, Platform: mmfast, Created by: mmfast.data.formats"
    header = text.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    body = b""
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.ndim < 2:
            array = array.reshape(-1, 1)
        dtype = array.dtype.newbyteorder("=")
        if dtype not in _MX_OF:
            raise TypeError(f"write_mat: unsupported dtype {array.dtype} for {name!r}")
        element = (_tagged(6, struct.pack("<II", _MX_OF[dtype], 0))
                   + _tagged(5, struct.pack(f"<{array.ndim}i", *array.shape))
                   + _tagged(1, name.encode("latin-1"))
                   + _tagged(_MI_OF[dtype], array.astype(dtype.newbyteorder("<")).tobytes(order="F")))
        element = _tagged(_MI_MATRIX, element)
        if compress:
            packed = zlib.compress(element)
            element = struct.pack("<II", _MI_COMPRESSED, len(packed)) + packed
        body += element
    with open(path, "wb") as f:
        f.write(header + body)
