"""With SAGE_STORAGE the dataset reaches training workers through the store, checksum-verified;
without it, workers read the path they are given."""

from __future__ import annotations

from pathlib import Path

from sage_ray.train.publish import local_dataset, share_dataset


def test_without_shared_storage_the_path_is_used_as_it_is(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("SAGE_STORAGE", raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    assert share_dataset(str(data)) == str(data) and local_dataset(str(data)) == str(data)


def test_a_shared_dataset_is_uploaded_once_and_fetched_verified(tmp_path: Path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("SAGE_STORAGE", f"file://{store}")
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "worker_home"))  # the worker node's own home
    data = tmp_path / "head" / "chat.json"
    data.parent.mkdir()
    data.write_text('[{"instruction": "a", "output": "b"}]')
    uri = share_dataset(str(data))
    assert uri.startswith(f"file://{store}/datasets/") and uri.endswith("/chat.json")
    uploaded = next(store.glob("datasets/*/chat.json"))
    stamp = uploaded.stat().st_mtime_ns
    assert share_dataset(str(data)) == uri and uploaded.stat().st_mtime_ns == stamp  # not uploaded again
    local = Path(local_dataset(uri))
    assert local.read_bytes() == data.read_bytes() and local.is_relative_to(tmp_path / "worker_home" / "cache")
    data.write_text('[{"instruction": "changed", "output": "b"}]')  # new content: a new shared copy
    assert share_dataset(str(data)) != uri
