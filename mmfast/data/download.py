"""Resumable, checksum-verified downloads of the original data files.

A file is fetched into ``<name>.part`` beside its destination. A later call (or a retry after a
dropped connection) asks the server for the remaining bytes with an HTTP ``Range`` request and
appends them; a server that ignores ranges sends the whole file and the part is rewritten. Only
a file whose MD5 matches the published checksum is renamed to its final name, so a final name
on disk always holds verified content. Errors name the URL, the file, how many bytes arrived and
what to do next.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class DownloadError(RuntimeError):
    """A download failed (HTTP error, refused or dropped connection); the part file is kept."""


class ChecksumError(DownloadError):
    """Downloaded content does not match its published checksum; the bad file is removed."""


@dataclass(frozen=True)
class Resource:
    """One file to fetch: its name in the data root, its URL and its MD5 (hex)."""
    filename: str
    url: str
    md5: str | None


# Published checksums of the original files (the ones torchvision's registries record too).
_MNIST_BASE = os.environ.get("MMFAST_MNIST_URL", "https://ossci-datasets.s3.amazonaws.com/mnist/")
_SVHN_BASE = os.environ.get("MMFAST_SVHN_URL", "http://ufldl.stanford.edu/housenumbers/")
MNIST_RESOURCES = {
    "train": [Resource("train-images-idx3-ubyte.gz", _MNIST_BASE + "train-images-idx3-ubyte.gz",
                       "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
              Resource("train-labels-idx1-ubyte.gz", _MNIST_BASE + "train-labels-idx1-ubyte.gz",
                       "d53e105ee54ea40749a09fcbcd1e9432")],
    "test": [Resource("t10k-images-idx3-ubyte.gz", _MNIST_BASE + "t10k-images-idx3-ubyte.gz",
                      "9fb629c4189551a2d022fa330f9573f3"),
             Resource("t10k-labels-idx1-ubyte.gz", _MNIST_BASE + "t10k-labels-idx1-ubyte.gz",
                      "ec29112dd5afa0611ce80d1b7f02629c")],
}
SVHN_RESOURCES = {
    "train": [Resource("train_32x32.mat", _SVHN_BASE + "train_32x32.mat",
                       "e26dedcc434d2e4c54c9b2d4a06d8373")],
    "test": [Resource("test_32x32.mat", _SVHN_BASE + "test_32x32.mat",
                      "eb5a983be6a315427106f1b164d9cef3")],
}


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_or_remove(path: Path, md5: str | None, url: str) -> None:
    if md5 is None:
        return
    got = md5sum(path)
    if got != md5.lower():
        size = path.stat().st_size
        path.unlink()
        raise ChecksumError(f"{url}: checksum mismatch for {path.name} ({size} bytes): MD5 {got}, "
                            f"expected {md5}. The file was removed; run again to download it afresh, "
                            f"or check the URL/mirror.")


def _transfer(url: str, part: Path, timeout: float, chunk: int, quiet: bool) -> None:
    """One attempt: fetch what is missing from ``part`` and append it (or rewrite on 200)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "mmfast"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # nothing left to send: the part is complete (the checksum decides)
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    with response:
        status = response.status
        if offset and status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise DownloadError(f"{url}: asked for bytes from {offset}, server answered "
                                    f"Content-Range {content_range!r}")
            mode = "ab"
        else:
            mode, offset = "wb", 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        received = 0
        with open(part, mode) as out:
            while True:
                block = response.read(chunk)
                if not block:
                    break
                out.write(block)
                received += len(block)
                if not quiet:
                    print(f"\r{part.name}: {(offset + received) / 1e6:.1f} MB", end="", file=sys.stderr)
        if not quiet:
            print(file=sys.stderr)
        if expected is not None and received < expected:
            raise http.client.IncompleteRead(b"", expected - received)


def download_file(url: str, dest: str | os.PathLike, md5: str | None = None, *, retries: int = 3,
                  timeout: float = 60.0, chunk: int = 1 << 20, quiet: bool = False) -> Path:
    """Fetch ``url`` to ``dest``, resuming a previous partial download, verifying ``md5``.

    Returns the path of the verified file. Raises :class:`DownloadError` when the server
    answers with an error or the connection keeps dropping (after ``retries`` resumed attempts;
    the part file stays for the next call to resume), :class:`ChecksumError` on a mismatch.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if md5 is None or md5sum(dest) == md5.lower():
            return dest
        dest.unlink()  # a corrupt final file: fetch it again
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for _ in range(retries + 1):
        try:
            _transfer(url, part, timeout, chunk, quiet)
            last_error = None
            break
        except DownloadError:
            raise
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                socket.timeout, TimeoutError, OSError) as exc:
            last_error = exc
    if last_error is not None:
        have = part.stat().st_size if part.exists() else 0
        raise DownloadError(f"{url}: download of {dest.name} failed after {retries + 1} attempt(s) "
                            f"with {have} bytes received ({type(last_error).__name__}: "
                            f"{last_error}). Run again to resume from {part}.") from last_error
    if not part.exists():
        raise DownloadError(f"{url}: the server sent nothing for {dest.name}")
    _verify_or_remove(part, md5, url)
    os.replace(part, dest)
    return dest


def download_resources(root: str | os.PathLike, resources: list[Resource], **kwargs) -> list[Path]:
    """Download each resource into ``root`` (see :func:`download_file`)."""
    return [download_file(r.url, Path(root) / r.filename, r.md5, **kwargs) for r in resources]
