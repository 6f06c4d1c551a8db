"""pipelines.fetch: verified, resumable, atomic downloads from a local HTTP server or a mirror; safe extraction."""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.fetch import FetchError, extract, fetch
from pipelines.hashing import digest

PAYLOAD = os.urandom(50_000)  # incompressible, so truncating a compressed archive really loses data
SHA256 = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
MD5 = "md5:" + hashlib.md5(PAYLOAD).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` unless told not to; can cut a transfer short."""

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        name = self.path.lstrip("/")
        body = srv.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng and name not in srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = srv.cut_after.pop(name, None)  # one-shot: promise the whole payload, send part, hang up
        self.wfile.write(payload if cut is None else payload[:cut])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("GAL_DATA_MIRROR", raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.cut_after, srv.ignore_range = {"data.bin": PAYLOAD}, [], {}, set()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# --- downloads -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checksum", [SHA256, MD5, SHA256.upper().replace("SHA256", "sha256"), None],
                         ids=["sha256", "md5", "sha256-uppercase", "none"])  # the same ids in every xdist worker
def test_download_verifies(server, tmp_path, checksum):
    dest = tmp_path / "raw" / "data.bin"
    assert fetch(server.url + "/data.bin", dest, checksum=checksum, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert list((tmp_path / "raw" / ".partial").iterdir()) == []


def test_progress_bar_does_not_break_download(server, tmp_path, capsys):
    fetch(server.url + "/data.bin", tmp_path / "data.bin", checksum=SHA256, progress=True)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    wrong = "sha256:" + "0" * 64
    with pytest.raises(FetchError) as excinfo:
        fetch(server.url + "/data.bin", tmp_path / "data.bin", checksum=wrong, progress=False)
    message = one_line(excinfo)
    assert "0" * 64 in message and hashlib.sha256(PAYLOAD).hexdigest() in message
    assert not (tmp_path / "data.bin").exists()
    assert list((tmp_path / ".partial").iterdir()) == []


def test_interrupted_download_keeps_part_and_resumes(server, tmp_path):
    server.cut_after["data.bin"] = 20_000
    dest, partial = tmp_path / "data.bin", tmp_path / "parts"
    with pytest.raises(FetchError) as excinfo:
        fetch(server.url + "/data.bin", dest, checksum=SHA256, partial_dir=partial, progress=False)
    assert "kept" in one_line(excinfo) and "20000 of 50000" in one_line(excinfo)
    assert not dest.exists()
    part = partial / "data.bin.part"
    assert part.read_bytes() == PAYLOAD[:20_000]

    fetch(server.url + "/data.bin", dest, checksum=SHA256, partial_dir=partial, progress=False)
    assert server.requests[-1] == ("/data.bin", "bytes=20000-")
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.ignore_range.add("data.bin")
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "data.bin.part").write_bytes(b"stale bytes from another attempt")
    fetch(server.url + "/data.bin", tmp_path / "data.bin", checksum=MD5, progress=False)
    assert server.requests == [("/data.bin", "bytes=32-")]
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_part_longer_than_file_restarts(server, tmp_path):
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / "data.bin.part").write_bytes(b"x" * 60_000)
    fetch(server.url + "/data.bin", tmp_path / "data.bin", checksum=SHA256, progress=False)
    assert server.requests == [("/data.bin", "bytes=60000-"), ("/data.bin", None)]
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_http_404_is_clear(server, tmp_path):
    with pytest.raises(FetchError) as excinfo:
        fetch(server.url + "/missing.bin", tmp_path / "missing.bin", progress=False)
    message = one_line(excinfo)
    assert "404" in message and server.url + "/missing.bin" in message
    assert not (tmp_path / "missing.bin").exists()


def test_connection_refused_is_clear(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens on this port any more
    with pytest.raises(FetchError) as excinfo:
        fetch(f"http://127.0.0.1:{port}/data.bin", tmp_path / "data.bin", progress=False, timeout=2)
    assert "network error" in one_line(excinfo)


def test_idempotent_second_call_makes_no_request(server, tmp_path):
    dest = tmp_path / "data.bin"
    for _ in range(2):
        fetch(server.url + "/data.bin", dest, checksum=SHA256, progress=False)
    assert len(server.requests) == 1


def test_existing_bad_file_is_fetched_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"corrupted")
    fetch(server.url + "/data.bin", dest, checksum=SHA256, progress=False)
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 1


@pytest.mark.parametrize("spec", ["sha1:" + "0" * 40, "sha256:xyz", "md5:abc", "0" * 64, "sha256-" + "0" * 64])
def test_bad_checksum_spec(server, tmp_path, spec):
    with pytest.raises(FetchError) as excinfo:
        fetch(server.url + "/data.bin", tmp_path / "data.bin", checksum=spec, progress=False)
    assert "bad checksum" in one_line(excinfo)
    assert server.requests == []


def test_unsupported_scheme(tmp_path):
    with pytest.raises(FetchError) as excinfo:
        fetch("ftp://127.0.0.1/data.bin", tmp_path / "data.bin", progress=False)
    assert "unsupported URL" in one_line(excinfo)


# --- mirrors ---------------------------------------------------------------------------------------------

@pytest.fixture
def mirror_dir(tmp_path):
    directory = tmp_path / "mirror"
    directory.mkdir()
    (directory / "data.bin").write_bytes(PAYLOAD)
    return directory


@pytest.mark.parametrize("as_url", [False, True], ids=["directory", "file-url"])
def test_mirror_argument(server, tmp_path, mirror_dir, as_url):
    mirror = mirror_dir.as_uri() if as_url else str(mirror_dir)
    dest = tmp_path / "out" / "data.bin"
    fetch(server.url + "/some/path/data.bin", dest, checksum=SHA256, mirror=mirror, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == []


def test_mirror_from_environment(server, tmp_path, mirror_dir, monkeypatch):
    monkeypatch.setenv("GAL_DATA_MIRROR", str(mirror_dir))
    fetch(server.url + "/data.bin", tmp_path / "data.bin", checksum=SHA256, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.requests == []


def test_mirror_http_base(server, tmp_path):
    server.files["mirror/data.bin"] = PAYLOAD
    fetch("https://example.invalid/x/data.bin", tmp_path / "data.bin", checksum=SHA256,
          mirror=server.url + "/mirror/", progress=False)
    assert server.requests == [("/mirror/data.bin", None)]


def test_mirror_missing_file(server, tmp_path, mirror_dir):
    with pytest.raises(FetchError) as excinfo:
        fetch(server.url + "/other.bin", tmp_path / "other.bin", mirror=str(mirror_dir), progress=False)
    assert str(mirror_dir / "other.bin") in one_line(excinfo)
    assert not (tmp_path / "other.bin").exists() and server.requests == []


def test_mirror_checksum_mismatch(tmp_path, mirror_dir):
    with pytest.raises(FetchError) as excinfo:
        fetch("https://example.invalid/data.bin", tmp_path / "data.bin", checksum="md5:" + "f" * 32,
              mirror=str(mirror_dir), progress=False)
    assert "checksum mismatch" in one_line(excinfo)
    assert not (tmp_path / "data.bin").exists()


def test_digest_helper(tmp_path):
    (tmp_path / "f").write_bytes(PAYLOAD)
    assert digest(tmp_path / "f", "sha256") == SHA256.split(":")[1]


# --- extraction ------------------------------------------------------------------------------------------

GOOD = {"top/a.txt": b"alpha", "top/sub/b.bin": PAYLOAD}


def make_tar(path: Path, mode: str = "w:gz", extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in GOOD.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def make_zip(path: Path, extra: list[zipfile.ZipInfo] = (), compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in GOOD.items():
            zf.writestr(name, data)
        for info in extra:
            zf.writestr(info, b"x")
    return path


def assert_extracted(dest_dir: Path):
    for name, data in GOOD.items():
        assert (dest_dir / name).read_bytes() == data
    assert sorted(p.name for p in dest_dir.parent.iterdir()) == [dest_dir.name]  # no temp dirs left


@pytest.mark.parametrize("mode", ["w:gz", "w"], ids=["tar.gz", "tar"])
def test_extract_tar(tmp_path, mode):
    archive = make_tar(tmp_path / "archive.bin", mode)  # detected by content, not by name
    dest_dir = tmp_path / "out" / "data"
    assert extract(archive, dest_dir) == dest_dir
    assert_extracted(dest_dir)


def test_extract_zip(tmp_path):
    archive = make_zip(tmp_path / "archive.zip")
    dest_dir = tmp_path / "out" / "data"
    extract(archive, dest_dir)
    assert_extracted(dest_dir)


def test_extract_replaces_existing_dir(tmp_path):
    dest_dir = tmp_path / "out" / "data"
    (dest_dir / "old").mkdir(parents=True)
    (dest_dir / "old" / "stale.txt").write_text("stale")
    extract(make_tar(tmp_path / "a.tgz"), dest_dir)
    assert not (dest_dir / "old").exists()
    assert_extracted(dest_dir)


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


def zip_member(name: str, mode: int = 0o100644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


HOSTILE_TAR = {
    "dotdot": tar_member("top/../../evil.txt"),
    "absolute": tar_member("/abs/evil.txt"),
    "drive": tar_member("C:/evil.txt"),
    "symlink": tar_member("top/link", tarfile.SYMTYPE, "/etc/passwd"),
    "hardlink": tar_member("top/hard", tarfile.LNKTYPE, "top/a.txt"),
    "fifo": tar_member("top/fifo", tarfile.FIFOTYPE),
    "device": tar_member("top/dev", tarfile.CHRTYPE),
}
HOSTILE_ZIP = {
    "dotdot": zip_member("../evil.txt"),
    "absolute": zip_member("/abs/evil.txt"),
    "backslash": zip_member("..\\evil.txt"),
    "symlink": zip_member("top/link", 0o120777),
}


def assert_nothing_extracted(tmp_path: Path, archive: Path):
    # dest_dir's parent may have been created (empty) before a damaged member showed up; nothing else may exist.
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert [p for p in tmp_path.rglob("*") if p not in (archive, tmp_path / "out")] == []


@pytest.mark.parametrize("case", HOSTILE_TAR)
def test_hostile_tar_member_rejected(tmp_path, case):
    member = HOSTILE_TAR[case]
    archive = make_tar(tmp_path / "a.tgz", extra=[member])
    with pytest.raises(FetchError) as excinfo:
        extract(archive, tmp_path / "out" / "data")
    assert repr(member.name) in one_line(excinfo)
    assert_nothing_extracted(tmp_path, archive)


@pytest.mark.parametrize("case", HOSTILE_ZIP)
def test_hostile_zip_member_rejected(tmp_path, case):
    member = HOSTILE_ZIP[case]
    archive = make_zip(tmp_path / "a.zip", extra=[member])
    with pytest.raises(FetchError) as excinfo:
        extract(archive, tmp_path / "out" / "data")
    assert repr(member.filename) in one_line(excinfo)
    assert_nothing_extracted(tmp_path, archive)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.002], ids=["half", "most", "header-only"])
def test_truncated_tar_gz(tmp_path, keep):
    archive = make_tar(tmp_path / "a.tgz")
    data = archive.read_bytes()
    archive.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FetchError) as excinfo:
        extract(archive, tmp_path / "out" / "data")
    assert one_line(excinfo).startswith("corrupt or truncated archive a.tgz:")
    assert_nothing_extracted(tmp_path, archive)


@pytest.mark.parametrize("damage", ["flip-data", "truncate"])
def test_corrupt_zip(tmp_path, damage):
    archive = make_zip(tmp_path / "a.zip", compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    if damage == "flip-data":
        at = data.index(PAYLOAD[:64]) + 1000  # inside the stored member: the CRC check catches it
        data[at] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    archive.write_bytes(bytes(data))
    with pytest.raises(FetchError) as excinfo:
        extract(archive, tmp_path / "out" / "data")
    assert one_line(excinfo).startswith("corrupt or truncated archive a.zip:")
    assert_nothing_extracted(tmp_path, archive)


def test_missing_archive(tmp_path):
    with pytest.raises(FetchError) as excinfo:
        extract(tmp_path / "nope.tgz", tmp_path / "out")
    assert "nope.tgz" in one_line(excinfo)
