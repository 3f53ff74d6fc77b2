"""sage_ray.storage against a real S3 server: moto's standalone server on 127.0.0.1, started
and stopped here. Upload a small model folder, fetch it on "the other side" into a fresh
cache, reuse the cache without touching the server, refuse a corrupted object without leaving
anything in the cache, and keep the cache under its bound by evicting the least recently used.
The server is the integration tests' `s3_server` (conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from sage_ray import storage

BUCKET = "sage-artifacts"


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fresh bucket on the server, sage-ray pointed at it, and a boto3 client on the side."""
    import boto3

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "SAGE_CACHE_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential probing of 169.254.169.254
    monkeypatch.setenv("SAGE_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "sage_home"))
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"{BUCKET}-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


def make_model(folder: Path, seed: int = 0, weights_bytes: int = 4096) -> Path:
    """A small model-like folder: config, tokenizer files and a binary weights file."""
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "seed": seed}))
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps({"vocab": {"a": 0, "b": seed}}))
    (folder / "model.safetensors").write_bytes(os.urandom(weights_bytes))
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != storage.CACHE_MARKER}


def dead_endpoint() -> str:
    """A local URL nothing listens on: any request to it fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_upload_then_fetch_elsewhere_and_reuse_cache(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = make_model(tmp_path / "merged_model")
    uri = f"s3://{s3.bucket}/studio_finetune/task_1/merged_model"

    manifest = storage.upload_dir(model, uri)

    assert set(manifest["files"]) == {"config.json", "tokenizer/tokenizer.json", "model.safetensors"}
    for rel, entry in manifest["files"].items():
        data = (model / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["total_bytes"] == sum(len(d) for d in local_files(model).values())
    stored = json.loads(s3.get_object(Bucket=s3.bucket, Key=f"studio_finetune/task_1/merged_model/"
                                                           f"{storage.MANIFEST}")["Body"].read())
    assert stored == manifest

    cache = tmp_path / "other_node_cache"
    fetched = storage.fetch(uri, cache_dir=cache)
    assert fetched.parent == cache
    assert local_files(fetched) == local_files(model)

    # Again with the store unreachable: the cached copy comes back, so nothing was requested.
    mtimes = {p: p.stat().st_mtime_ns for p in fetched.rglob("*") if p.name != storage.CACHE_MARKER}
    monkeypatch.setenv("SAGE_S3_ENDPOINT", dead_endpoint())
    assert storage.fetch(uri, cache_dir=cache) == fetched
    assert {p: p.stat().st_mtime_ns for p in fetched.rglob("*") if p.name != storage.CACHE_MARKER} == mtimes
    with pytest.raises(storage.StorageError):  # proves the dead endpoint really is used
        storage.fetch(uri, cache_dir=tmp_path / "empty_cache")


def test_default_cache_and_resolve_local(s3, tmp_path: Path):
    model = make_model(tmp_path / "lora", seed=3)
    uri = f"s3://{s3.bucket}/lora/"  # a trailing slash names the same place
    storage.upload_dir(model, uri)

    fetched = storage.resolve_local(uri)

    assert fetched.parent == Path(os.environ["SAGE_HOME"]) / "cache"
    assert local_files(fetched) == local_files(model)
    assert storage.resolve_local(str(model)) == model
    assert storage.resolve_local(model) == model
    assert storage.resolve_local(f"file://{model}") == model
    assert storage.fetch(str(model)) == model  # a mounted path needs no copy


def test_corrupted_object_raises_and_caches_nothing(s3, tmp_path: Path):
    model = make_model(tmp_path / "model")
    uri = f"s3://{s3.bucket}/corrupt/model"
    storage.upload_dir(model, uri)
    s3.put_object(Bucket=s3.bucket, Key="corrupt/model/model.safetensors", Body=os.urandom(4096))
    cache = tmp_path / "cache"

    with pytest.raises(storage.ChecksumError, match="model.safetensors.*does not match its manifest"):
        storage.fetch(uri, cache_dir=cache)

    leftovers = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # no entry, no temp folder


def test_missing_manifest_says_to_upload(s3, tmp_path: Path):
    s3.put_object(Bucket=s3.bucket, Key="half/model/config.json", Body=b"{}")
    with pytest.raises(storage.StorageError, match="no sage_manifest.json.*upload_dir"):
        storage.fetch(f"s3://{s3.bucket}/half/model", cache_dir=tmp_path / "cache")

    # A manifest naming a file outside its folder is refused before anything is written.
    evil = {"format": 1, "total_bytes": 2, "files": {"../../escaped.txt": {"size": 2, "sha256": "0" * 64}}}
    s3.put_object(Bucket=s3.bucket, Key=f"evil/model/{storage.MANIFEST}", Body=json.dumps(evil).encode())
    with pytest.raises(storage.StorageError, match="unsafe"):
        storage.fetch(f"s3://{s3.bucket}/evil/model", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()


def test_reupload_and_refresh(s3, tmp_path: Path):
    uri = f"s3://{s3.bucket}/reupload/model"
    storage.upload_dir(make_model(tmp_path / "v1", seed=1), uri)
    cache = tmp_path / "cache"
    first = storage.fetch(uri, cache_dir=cache)
    v2 = make_model(tmp_path / "v2", seed=2)
    storage.upload_dir(v2, uri)

    again = storage.fetch(uri, cache_dir=cache, refresh=True)

    assert again == first
    assert local_files(again) == local_files(v2)


def test_lru_bound_evicts_least_recently_used(s3, tmp_path: Path):
    uris = {}
    for name in ("a", "b", "c"):
        uris[name] = f"s3://{s3.bucket}/lru/{name}"
        storage.upload_dir(make_model(tmp_path / name, weights_bytes=4000), uris[name])
    size = storage.read_manifest(uris["a"])["total_bytes"]
    cache, bound = tmp_path / "cache", 2 * size + size // 2  # room for two entries
    entry = {name: storage.fetch(uri, cache_dir=cache, max_cache_bytes=bound) for name, uri in uris.items()
             if name != "c"}
    os.utime(entry["a"] / storage.CACHE_MARKER, (1, 1))  # make `a` clearly older than `b` ...
    os.utime(entry["b"] / storage.CACHE_MARKER, (2, 2))
    storage.fetch(uris["a"], cache_dir=cache, max_cache_bytes=bound)  # ... then use it again

    entry["c"] = storage.fetch(uris["c"], cache_dir=cache, max_cache_bytes=bound)

    assert entry["a"].is_dir() and entry["c"].is_dir()
    assert not entry["b"].exists()  # the least recently used one went

    # An entry larger than the whole bound is still returned; everything else makes room.
    big = storage.fetch(uris["b"], cache_dir=cache, max_cache_bytes=size // 2)
    assert local_files(big) == local_files(tmp_path / "b")
    assert not entry["a"].exists() and not entry["c"].exists()


def test_pyarrow_reads_aws_endpoint_url(s3, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The standard AWS variable works too, without SAGE_S3_ENDPOINT."""
    monkeypatch.delenv("SAGE_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    model = make_model(tmp_path / "model")
    uri = f"s3://{s3.bucket}/aws-env/model"

    storage.upload_dir(model, uri)

    assert local_files(storage.fetch(uri, cache_dir=tmp_path / "cache")) == local_files(model)


def test_upload_to_mounted_path_and_uri_helpers(tmp_path: Path):
    model = make_model(tmp_path / "model")
    shared = tmp_path / "efs" / "studio_finetune" / "t" / "lora"

    manifest = storage.upload_dir(model, shared)

    assert local_files(shared) == {**local_files(model), storage.MANIFEST: (shared / storage.MANIFEST).read_bytes()}
    assert storage.read_manifest(shared) == manifest
    with pytest.raises(storage.StorageError, match="not a folder with files"):
        storage.upload_dir(tmp_path / "missing", tmp_path / "x")
    assert storage.is_uri("s3://bucket/prefix") and storage.is_uri("gs://b/p") and storage.is_uri("file:///x")
    assert not storage.is_uri("/mnt/efs/model") and not storage.is_uri("relative/dir")
    assert not storage.is_uri(Path("/x")) and not storage.is_uri("C:\\models")
    assert storage.join("s3://b/p/", "task", "lora") == "s3://b/p/task/lora"
    assert storage.join("s3://b/p?region=eu-west-1", "lora") == "s3://b/p/lora?region=eu-west-1"
    assert storage.join("/mnt/efs", "task", "lora") == "/mnt/efs/task/lora"


def test_shared_root_is_opt_in(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SAGE_STORAGE", raising=False)
    assert storage.shared_root() is None  # the single-machine default: SAGE_HOME only
    monkeypatch.setenv("SAGE_STORAGE", " s3://bucket/sage ")
    assert storage.shared_root() == "s3://bucket/sage"
