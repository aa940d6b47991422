"""Downloads against a local HTTP server on 127.0.0.1: resume with Range after a dropped
connection, checksum verification, clear errors, and MNISTSVHNText(download=True) end to end.
No test touches the internet."""
import hashlib
import http.server
import threading

import pytest
import torch

from _mst_files import make_mnist_svhn
from mmfast.data import ChecksumError, DownloadError, MNISTSVHNText, Resource, download_file


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (name -> bytes) with Range support; ``server.drop`` names files
    whose next transfer is cut after half of the bytes it promised."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        if name not in server.files:
            self.send_error(404, "Not Found")
            return
        body = server.files[name]
        start = 0
        rng = self.headers.get("Range")
        if rng and server.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if name in server.drop:
            server.drop.discard(name)
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.drop, httpd.requests, httpd.ranges = {}, set(), [], True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_resume_after_dropped_connection(server, tmp_path):
    body = bytes(range(256)) * 400
    server.files["f.bin"] = body
    server.drop.add("f.bin")
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="Run again to resume"):
        download_file(server.url + "f.bin", dest, _md5(body), retries=0, quiet=True)
    part = tmp_path / "f.bin.part"
    assert part.exists() and 0 < part.stat().st_size < len(body) and not dest.exists()
    have = part.stat().st_size
    download_file(server.url + "f.bin", dest, _md5(body), retries=0, quiet=True)
    assert dest.read_bytes() == body and not part.exists()
    assert server.requests[-1] == ("f.bin", f"bytes={have}-")


def test_retry_resumes_within_one_call(server, tmp_path):
    body = b"abcdefgh" * 1000
    server.files["g.bin"] = body
    server.drop.add("g.bin")
    download_file(server.url + "g.bin", tmp_path / "g.bin", _md5(body), retries=2, quiet=True)
    assert (tmp_path / "g.bin").read_bytes() == body
    assert [r for _, r in server.requests] == [None, f"bytes={len(body) // 2}-"]


def test_server_without_ranges_restarts_cleanly(server, tmp_path):
    body = b"0123456789" * 500
    server.files["h.bin"] = body
    server.ranges = False
    (tmp_path / "h.bin.part").write_bytes(b"garbage-prefix")
    download_file(server.url + "h.bin", tmp_path / "h.bin", _md5(body), quiet=True)
    assert (tmp_path / "h.bin").read_bytes() == body


def test_complete_part_gets_416_and_is_verified(server, tmp_path):
    body = b"x" * 1000
    server.files["c.bin"] = body
    (tmp_path / "c.bin.part").write_bytes(body)
    download_file(server.url + "c.bin", tmp_path / "c.bin", _md5(body), quiet=True)
    assert (tmp_path / "c.bin").read_bytes() == body


def test_checksum_mismatch_and_http_errors(server, tmp_path):
    server.files["k.bin"] = b"payload"
    with pytest.raises(ChecksumError, match="expected 0{32}"):
        download_file(server.url + "k.bin", tmp_path / "k.bin", "0" * 32, quiet=True)
    assert not (tmp_path / "k.bin").exists() and not (tmp_path / "k.bin.part").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url + "missing.bin", tmp_path / "m.bin", None, quiet=True)
    # an existing verified file is not fetched again
    (tmp_path / "k.bin").write_bytes(b"payload")
    n = len(server.requests)
    download_file(server.url + "k.bin", tmp_path / "k.bin", _md5(b"payload"), quiet=True)
    assert len(server.requests) == n


def test_refused_connection_is_a_clear_error(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="failed after 1 attempt"):
        download_file(f"http://127.0.0.1:{port}/x", tmp_path / "x", None, retries=0, timeout=5, quiet=True)


def test_mnist_svhn_text_download(server, tmp_path):
    origin = tmp_path / "origin"
    make_mnist_svhn(origin, gz=True)
    resources = []
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "test_32x32.mat"):
        data = (origin / name).read_bytes()
        server.files[name] = data
        resources.append(Resource(name, server.url + name, _md5(data)))
    server.drop.add("test_32x32.mat")
    root = tmp_path / "root"
    data = MNISTSVHNText(root, "test", download=True, resources=resources, num_pairings=3, quiet=True)
    assert len(data) == 3 * 20
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "test_32x32.mat"):
        assert (root / name).read_bytes() == (origin / name).read_bytes()
    b = data.batch(torch.arange(4))
    assert b["x"]["svhn"].shape == (4, 3, 32, 32)
    # nothing is fetched when the files are there
    n = len(server.requests)
    MNISTSVHNText(root, "test", download=True, resources=resources, num_pairings=3, quiet=True)
    assert len(server.requests) == n
