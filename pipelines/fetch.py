"""Get one dataset file from its source onto disk, verified and atomically; extract archives safely.

    tgz = fetch("https://example.org/cifar-10-python.tar.gz", Path("data/raw/cifar-10-python.tar.gz"),
                checksum="md5:<32 hex digits>")
    extract(tgz, Path("data/raw/cifar-10"))

A mirror (argument ``mirror``, else env ``GAL_DATA_MIRROR``: a directory, a file:// URL of one, or an
http(s) base URL) replaces the source; the file is looked up there by the URL's basename. Downloads stream
into ``<partial_dir>/<name>.part`` and resume with a Range request after an interruption; ``dest`` only
ever holds a complete, verified file. Every failure raises FetchError with one line: what and what to do.
"""
from __future__ import annotations

import errno
import gzip
import http.client
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from pipelines.atomic import replace_dir, temp_dir_beside
from pipelines.errors import UserError
from pipelines.hashing import digest

try:
    from tqdm import tqdm
except ImportError:  # the bar is cosmetic; downloads work without it
    tqdm = None

MIRROR_ENV = "GAL_DATA_MIRROR"
CHUNK = 1 << 20
HEX_LENGTHS = {"md5": 32, "sha256": 64}
# What a damaged tar/gzip/zip stream raises while being read.
CORRUPT = (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error)


class FetchError(UserError):
    """A fetch or extract failed; the message is one line saying what happened and what to do."""


def _parse_checksum(checksum: str) -> tuple[str, str]:
    m = re.fullmatch(r"(md5|sha256):([0-9a-fA-F]+)", str(checksum))
    if not m or len(m.group(2)) != HEX_LENGTHS[m.group(1)]:
        raise FetchError(f"bad checksum {checksum!r}: write it as 'md5:<32 hex digits>' or 'sha256:<64 hex digits>'")
    return m.group(1), m.group(2).lower()


def fetch(url: str, dest: Path, *, checksum: str | None = None, mirror: str | None = None,
          partial_dir: Path | None = None, progress: bool = True, timeout: float = 60) -> Path:
    """Put the file at ``url`` (or its mirror copy) at ``dest``, verified; return ``dest``."""
    dest = Path(dest)
    expected = _parse_checksum(checksum) if checksum is not None else None
    if dest.is_file():
        if expected is None or digest(dest, expected[0]) == expected[1]:
            return dest
        dest.unlink()  # stale or corrupt: fetch again, and never leave a bad file at dest
    source = _resolve_source(url, mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None)
    partial_dir = Path(partial_dir) if partial_dir is not None else dest.parent / ".partial"
    partial_dir.mkdir(parents=True, exist_ok=True)
    part = partial_dir / (dest.name + ".part")
    if isinstance(source, Path):
        try:
            shutil.copyfile(source, part)
        except OSError as e:
            raise FetchError(f"could not copy {source} to {part}: {e}") from None
    else:
        _download(source, part, progress, timeout)
    if expected is not None:
        algorithm, want = expected
        got = digest(part, algorithm)
        if got != want:
            part.unlink()  # a complete but wrong file is no use for resuming
            raise FetchError(f"checksum mismatch for {source}: expected {algorithm}:{want}, got {algorithm}:{got}; "
                             "the download was discarded, check the checksum or the source")
    _move_into_place(part, dest)
    return dest


def _resolve_source(url: str, mirror: str | None) -> Path | str:
    """The local file (a Path) or http(s) URL (a str) to read ``url`` from."""
    if mirror:
        name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        if not name:
            raise FetchError(f"cannot use a mirror for {url}: the URL names no file")
        if urllib.parse.urlsplit(mirror).scheme in ("http", "https"):
            return mirror.rstrip("/") + "/" + urllib.parse.quote(name)
        path = _local_path(mirror) / name
        if not path.is_file():
            raise FetchError(f"{name} not found in mirror: looked for {path}; put it there or point the mirror "
                             f"(argument or {MIRROR_ENV}) elsewhere")
        return path
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("http", "https"):
        return url
    if scheme == "file":
        path = _local_path(url)
        if not path.is_file():
            raise FetchError(f"file not found: {path} (from {url})")
        return path
    raise FetchError(f"unsupported URL {url!r}: use http://, https:// or file://")


def _local_path(location: str) -> Path:
    parts = urllib.parse.urlsplit(location)
    return Path(urllib.request.url2pathname(parts.path)) if parts.scheme == "file" else Path(location)


def _download(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Stream ``url`` into ``part``, resuming from the bytes already there when the server allows it."""
    for _ in range(2):  # a second pass only after discarding a .part the server would not resume
        offset = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "gal-repro-fetch"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and offset:  # .part already as long as the file (or longer): start over
                part.unlink()
                continue
            raise FetchError(f"HTTP {e.code} {e.reason} for {url}; check the URL or set a mirror ({MIRROR_ENV})"
                             ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise FetchError(f"network error fetching {url}: {reason}; {_kept(part)}") from None
        with response:
            resumed = response.status == 206
            if resumed and not re.match(rf"bytes {offset}-", response.headers.get("Content-Range", "")):
                part.unlink()  # the server sent some other range: appending it would corrupt the file
                continue
            length = response.headers.get("Content-Length")
            received = offset if resumed else 0  # a 200 answer to a Range request is the whole file again
            total = received + int(length) if length is not None and length.isdigit() else None
            bar = None
            if progress and tqdm is not None:
                bar = tqdm(total=total, initial=received, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=part.name[: -len(".part")], file=sys.stderr, leave=False)
            try:
                with open(part, "ab" if resumed else "wb") as out:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as e:
                raise FetchError(f"download of {url} failed after {received} bytes: {e}; {_kept(part)}") from None
            finally:
                if bar is not None:
                    bar.close()
        # http.client returns b"" when the peer closes early instead of raising, so count the bytes.
        if total is not None and received < total:
            raise FetchError(f"download of {url} interrupted at {received} of {total} bytes; {_kept(part)}")
        return
    raise FetchError(f"{url}: the server would not resume the partial download; run the fetch again")


def _kept(part: Path) -> str:
    return f"partial file {part} kept, run the fetch again to resume" if part.exists() else "run the fetch again"


def _move_into_place(part: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(part, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise FetchError(f"could not move {part} to {dest}: {e}") from None
        # partial_dir is on another filesystem: copy next to dest so the last step is still one rename.
        staging = dest.with_name(f".{dest.name}.staging")
        shutil.copyfile(part, staging)
        os.replace(staging, dest)
        part.unlink()


def extract(archive: Path, dest_dir: Path) -> Path:
    """Unpack a tar (any compression) or zip into ``dest_dir``, which ends up complete or absent."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise FetchError(f"archive not found: {archive}; fetch it first")
    tmp = None
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    check_member(archive, info.filename, _zip_kind(info))
                tmp = temp_dir_beside(dest_dir)
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()  # reads the whole stream, so truncation shows up before extracting
                for member in members:
                    check_member(archive, member.name, tar_kind(member))
                tmp = temp_dir_beside(dest_dir)
                tf.extractall(tmp, members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        else:
            raise FetchError(f"corrupt or truncated archive {archive.name}: neither a tar nor a zip file; "
                             "fetch it again")
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CORRUPT):
            raise FetchError(f"corrupt or truncated archive {archive.name}: {e}; fetch it again") from None
        if isinstance(e, OSError):
            raise FetchError(f"could not extract {archive.name} into {dest_dir}: {e}") from None
        raise
    try:
        replace_dir(tmp, dest_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"could not move the extracted files to {dest_dir}: {e}") from None
    return dest_dir


def check_member(archive: Path, name: str, kind: str) -> None:
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise FetchError(f"refusing to extract {archive.name}: member {name!r} has an unsafe path")
    if kind not in ("file", "dir"):
        raise FetchError(f"refusing to extract {archive.name}: member {name!r} is a {kind}")


def tar_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "device or fifo" if member.isdev() else "special member"


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # Unix mode bits, 0 when the zip was not made on Unix
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "device or fifo"
    return "dir" if info.is_dir() else "file"
