"""Artifacts on shared storage: a mounted folder (NFS/EFS) or an object store URI (`s3://...`).

A mounted folder needs nothing special: every node reads the same path. An object store is
reached through pyarrow's filesystems, as Ray Train reaches its `storage_path`. `upload_dir`
writes a folder's files and then `sage_manifest.json` (each file's size and sha256), last, so
a manifest only ever describes a finished upload. `fetch` copies a URI into a local cache under
`$SAGE_HOME/cache/`, checks every file against the manifest and renames the finished copy into
place, so a reader never sees a partial or corrupt model. Artifacts at a URI are written once
(a task id is never reused), so a cached copy is reused without asking the store again;
`refresh=True` re-checks the remote manifest.

S3-compatible servers (MinIO, moto, Ceph): set `SAGE_S3_ENDPOINT` (or `AWS_ENDPOINT_URL`) to
their URL, e.g. `http://127.0.0.1:9000`; credentials come from the usual AWS variables/files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from sage_ray import env
from sage_ray.paths import sage_home

log = logging.getLogger(__name__)

MANIFEST = "sage_manifest.json"
CACHE_MARKER = ".sage_cache.json"  # inside a cache entry: its URI, manifest and size
MANIFEST_FORMAT = 1
CHUNK = 8 * 1024**2
TRANSFER_THREADS = 8
DEFAULT_MAX_CACHE_BYTES = 100 * 1024**3  # a few 7B models; override with SAGE_CACHE_MAX_BYTES
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


class StorageError(RuntimeError):
    """Shared storage could not give or take an artifact; the message says what to do next."""


class ChecksumError(StorageError):
    """A fetched file does not match its manifest: the stored artifact is corrupt or changed."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (s3, gs, file, ...); False for plain and mounted paths."""
    return isinstance(path, str) and bool(_URI.match(path))


def shared_root() -> str | None:
    """Where artifacts are shared beyond this machine: `SAGE_STORAGE` (an `s3://bucket/prefix`
    URI or a mounted folder), or None: SAGE_HOME alone, the single-machine default."""
    return env.value("SAGE_STORAGE")


def forwarded_env() -> dict[str, str]:
    """The storage settings of this process, for the runtime_env of what runs elsewhere (Ray
    jobs, training workers and Serve replicas do not inherit the submitting shell's environment).
    Secrets (AWS_ACCESS_KEY_ID, ...) are not forwarded: a job's environment is readable on the
    dashboard; give nodes an instance role, or put the keys in a file that
    AWS_SHARED_CREDENTIALS_FILE names on every node. The list: sage_ray.env.TABLE."""
    return env.forwarded("everywhere")


def task_uri(task_id: str) -> str | None:
    """Where a task's checkpoints and models are shared (`<SAGE_STORAGE>/studio_finetune/<id>`,
    the layout of SAGE_HOME), or None when artifacts stay in SAGE_HOME only."""
    root = shared_root()
    return join(root, "studio_finetune", task_id) if root else None


def write_json(uri: str | os.PathLike, data: dict[str, Any]) -> None:
    """One JSON file at `uri` (a URI or a local path)."""
    fs, path = filesystem(uri)
    _write_bytes(fs, path, json.dumps(data, indent=2, default=str).encode())


def read_json(uri: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON file at `uri`, or None when there is none."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def delete_tree(uri: str | os.PathLike) -> bool:
    """Remove everything under `uri`; True if something was there."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return False
    fs.delete_dir(path)
    return True


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base` with path parts appended; works for local paths and URIs (query kept)."""
    if not is_uri(base):
        return os.fspath(Path(base).joinpath(*parts))
    split = urlsplit(base)
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit(split._replace(path=path))


def resolve_local(path_or_uri: str | os.PathLike, **fetch_options: Any) -> Path:
    """A local folder for `path_or_uri`: local and mounted paths unchanged, URIs fetched."""
    if is_uri(path_or_uri):
        if urlsplit(path_or_uri).scheme == "file":  # already on this machine
            return Path(urlsplit(path_or_uri).path)
        return fetch(path_or_uri, **fetch_options)
    return Path(path_or_uri).expanduser()


def filesystem(uri: str | os.PathLike):
    """(pyarrow FileSystem, path inside it) for a URI or a local path."""
    from pyarrow import fs as pafs

    target = os.fspath(uri)
    if not is_uri(target):
        return pafs.LocalFileSystem(), str(Path(target).expanduser().absolute())
    split = urlsplit(target)
    endpoint = env.value("SAGE_S3_ENDPOINT")
    if split.scheme == "s3" and endpoint and not split.query:
        # pyarrow reads AWS_ENDPOINT_URL itself; SAGE_S3_ENDPOINT points only sage-ray at a
        # server without redirecting every other AWS client in the process.
        region = env.value("AWS_REGION") or env.value("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region), split.netloc + split.path.rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(target)
        return fs, path.rstrip("/")
    except Exception as err:
        raise StorageError(f"cannot open {target}: {err}. Check the URI, the credentials (AWS_* variables "
                           "or ~/.aws) and, for an S3-compatible server, SAGE_S3_ENDPOINT") from err


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> dict[str, Any]:
    """Copy every file under `local_dir` to `uri`, then write its manifest there; returns it.

    Any previous manifest at `uri` is removed first, so while files are replaced nobody can
    fetch a mix of old and new files as a complete artifact.
    """
    source = Path(local_dir).expanduser()
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != MANIFEST)
    if not source.is_dir() or not files:
        raise StorageError(f"{source} is not a folder with files in it; give the artifact's folder "
                           "(e.g. a task's lora/ or merged_model/)")
    fs, base = filesystem(uri)
    _delete_if_present(fs, f"{base}/{MANIFEST}")
    rels = [path.relative_to(source).as_posix() for path in files]
    sums = _in_parallel(lambda rel: _copy_hashing(source / rel, fs, f"{base}/{rel}"), rels)
    entries = dict(zip(rels, sums))
    manifest = {"format": MANIFEST_FORMAT, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "total_bytes": sum(e["size"] for e in entries.values()), "files": entries}
    _write_bytes(fs, f"{base}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    log.info("uploaded %d files (%d bytes) from %s to %s", len(entries), manifest["total_bytes"], source, uri)
    return manifest


def read_manifest(uri: str | os.PathLike) -> dict[str, Any]:
    """The manifest stored at `uri`, checked for shape and for paths that stay inside it."""
    fs, base = filesystem(uri)
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError as err:
        raise StorageError(f"no {MANIFEST} at {uri}: nothing was uploaded there, or the upload did not "
                           "finish; upload the folder again with sage_ray.storage.upload_dir") from err
    except OSError as err:  # unreachable endpoint, refused credentials, no such bucket
        raise StorageError(f"cannot read {MANIFEST} at {uri}: {err}. Check the network, the credentials "
                           "(AWS_* variables or ~/.aws) and, for an S3-compatible server, SAGE_S3_ENDPOINT") from err
    except ValueError as err:
        raise StorageError(f"{MANIFEST} at {uri} is not valid JSON ({err}); upload the folder again") from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise StorageError(f"{MANIFEST} at {uri} is not a format-{MANIFEST_FORMAT} sage-ray manifest; "
                           "upload the folder again with this version of sage-ray")
    for rel, entry in files.items():
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or ".." in parts or not isinstance(entry, dict):
            raise StorageError(f"{MANIFEST} at {uri} lists an unsafe or malformed entry {rel!r}; refusing it")
    return manifest


def fetch(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
          max_cache_bytes: int | None = None, *, refresh: bool = False) -> Path:
    """A verified local copy of the artifact at `uri`, downloaded once into the cache.

    `cache_dir` defaults to `$SAGE_HOME/cache`; `max_cache_bytes` (default
    `SAGE_CACHE_MAX_BYTES`, else 100 GiB) bounds the cache: least recently used entries
    are evicted, never the one returned. A local path is returned as it is.
    """
    if not is_uri(uri):
        return resolve_local(uri)
    cache = Path(cache_dir).expanduser() if cache_dir else sage_home() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / _cache_key(uri)
    with _locked(cache / f".{entry.name}.lock"):
        marker = _valid_marker(entry, uri)
        if marker is not None and refresh and read_manifest(uri) != marker["manifest"]:
            log.info("%s changed since it was cached: downloading it again", uri)
            marker = None
        if marker is None:
            _download(uri, entry)
        os.utime(entry / CACHE_MARKER)  # the marker's mtime is the entry's last use, for LRU
    limit = max_cache_bytes if max_cache_bytes is not None else _default_limit()
    with _locked(cache / ".evict.lock"):
        evict(cache, limit, keep=entry)
    return entry


def evict(cache_dir: str | os.PathLike, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Remove least recently used cache entries until the cache holds at most `max_bytes`;
    `keep` is never removed, even when it alone is larger. Returns the removed entries."""
    entries = []
    for child in Path(cache_dir).iterdir():
        marker = _read_json(child / CACHE_MARKER) if child.is_dir() else None
        try:
            if marker is not None:
                entries.append(((child / CACHE_MARKER).stat().st_mtime, child, int(marker.get("bytes", 0))))
        except (OSError, ValueError, TypeError):  # removed meanwhile by another process, or unreadable
            continue
    total = sum(size for _used, _child, size in entries)
    removed = []
    for _used, child, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if keep is not None and child == keep:
            continue
        with _locked(child.parent / f".{child.name}.lock", wait=False) as got:
            if not got:  # another process is fetching or checking it right now: in use
                continue
            # The marker goes first: a half-removed entry is then never taken for a valid one.
            (child / CACHE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(child, ignore_errors=True)
        total -= size
        removed.append(child)
        log.info("cache: evicted %s (%d bytes) to stay under %d bytes", child, size, max_bytes)
    if total > max_bytes:
        log.warning("cache %s holds %d bytes, over its bound of %d, in entries in use right now; raise "
                    "SAGE_CACHE_MAX_BYTES above the largest model this node serves", cache_dir, total, max_bytes)
    return removed


def _download(uri: str, entry: Path) -> None:
    """Download `uri` into a temp sibling of `entry`, verify it, then rename it into place."""
    manifest = read_manifest(uri)
    fs, base = filesystem(uri)
    for stale in entry.parent.glob(f".tmp-{entry.name}-*"):  # left by a crashed fetch (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        started = time.monotonic()
        _in_parallel(lambda item: _fetch_file(fs, f"{base}/{item[0]}", tmp / item[0], item[1],
                                              f"{uri} file {item[0]!r}"), list(manifest["files"].items()))
        marker = {"uri": uri, "bytes": manifest["total_bytes"], "manifest": manifest,
                  "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp is private; serving processes may run as another user
        if entry.exists():  # an entry without a valid marker: an interrupted eviction
            shutil.rmtree(entry)
        os.replace(tmp, entry)
        log.info("fetched %s (%d bytes) in %.1f s into %s", uri, manifest["total_bytes"],
                 time.monotonic() - started, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fetch_file(fs, src: str, dest: Path, expected: dict[str, Any], what: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(src) as stream, open(dest, "wb") as out:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except FileNotFoundError as err:
        raise StorageError(f"{what} is listed in the manifest but missing from the store; "
                           "upload the folder again with sage_ray.storage.upload_dir") from err
    if size != expected.get("size") or digest.hexdigest() != expected.get("sha256"):
        raise ChecksumError(
            f"{what} does not match its manifest (expected {expected.get('size')} bytes, sha256 "
            f"{expected.get('sha256')}; got {size} bytes, sha256 {digest.hexdigest()}): the stored copy is "
            "corrupt or was changed after upload. Upload the folder again with sage_ray.storage.upload_dir; "
            "nothing was cached")


def _valid_marker(entry: Path, uri: str) -> dict[str, Any] | None:
    """The entry's marker when the entry is complete for `uri` (every file there, right size)."""
    marker = _read_json(entry / CACHE_MARKER)
    if marker is None or marker.get("uri") != uri:
        return None
    try:
        files = marker["manifest"]["files"].items()
    except (KeyError, TypeError, AttributeError):
        return None
    for rel, expected in files:
        path = entry / rel
        if not path.is_file() or path.stat().st_size != expected.get("size"):
            log.warning("cache entry %s lacks or has a changed %s: downloading %s again", entry, rel, uri)
            return None
    return marker


def _copy_hashing(path: Path, fs, dest: str) -> dict[str, Any]:
    """Stream one file to `dest`, hashing it on the way, so each file is read only once."""
    digest, size = hashlib.sha256(), 0
    if fs.type_name == "local":
        fs.create_dir(str(PurePosixPath(dest).parent), recursive=True)
    with open(path, "rb") as src, fs.open_output_stream(dest) as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _write_bytes(fs, dest: str, data: bytes) -> None:
    if fs.type_name == "local":
        fs.create_dir(str(PurePosixPath(dest).parent), recursive=True)
    with fs.open_output_stream(dest) as out:
        out.write(data)


def _delete_if_present(fs, path: str) -> None:
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def _in_parallel(work: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """`work` on every item, several at a time: a model's weight shards download side by side
    (pyarrow and hashlib release the GIL). Results in order; the first error is raised."""
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        try:
            return list(pool.map(work, items))
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the transfers not started yet are pointless now
            raise


def _cache_key(uri: str) -> str:
    """A folder name per URI: readable (its last part) and unique (a hash of the whole URI)."""
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1])[:60]
    return f"{tail or 'root'}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def _default_limit() -> int:
    raw = env.value("SAGE_CACHE_MAX_BYTES")
    try:
        return int(raw) if raw else DEFAULT_MAX_CACHE_BYTES
    except ValueError as err:
        raise StorageError(f"SAGE_CACHE_MAX_BYTES={raw!r} is not a whole number of bytes; "
                           "e.g. SAGE_CACHE_MAX_BYTES=107374182400 for 100 GiB") from err


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock between processes on this machine (two replicas fetching one model);
    with `wait=False`, yields False at once instead of waiting for a holder."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
