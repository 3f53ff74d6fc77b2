"""Find finished fine-tunes and local base models under `$SAGE_HOME` and describe them as
artifact records. Nothing is written here: the registry upserts what `discover` returns.

Names (unique: folder names are claimed in the order below, then the derived `-lora` names,
which get `-2`, `-3`, ... in the rare case of a clash):
- `studio_finetune/<task_id>/` with `finetune_meta.json` (a task without it has not completed):
  `<task_id>` is the task's preferred model, the merged model when there is one, else the
  LoRA adapter; when both exist the adapter is `<task_id>-lora`. So a task id always names
  "the" model of the task, and both artifacts are listed.
- `finetune_output/<name>/` (older SAGE): the same rule, with `merged_model/` and the adapter
  in `lora_weights/`, else the newest `checkpoints/checkpoint-N` by N as a number. When a
  sage-ray task already holds the name, the stem becomes `<name>-sage`.
- `models/<folder>/` with config.json (base models kept locally): `<folder>`, else `<folder>-base`.
A folder that cannot be read or holds no usable model is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from sage_ray.artifacts import ADAPTER_CONFIG, LORA_DIR, MERGED_DIR, META, MODEL_CONFIG, is_adapter, is_model  # noqa: F401
from sage_ray.registry.store import ArtifactRecord

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def discover(sage_home: str | os.PathLike) -> list[ArtifactRecord]:
    """Every artifact found under `sage_home`, named by the rules in this module's docstring."""
    home = Path(sage_home).expanduser()
    sources: list[tuple[str, Callable[[Path], list[ArtifactRecord]], str]] = [
        ("studio_finetune", describe_task, ""), ("finetune_output", describe_legacy, "-sage"),
        ("models", describe_base, "-base")]
    described: list[tuple[list[ArtifactRecord], str, str]] = []
    for subdir, describe, alt in sources:
        for folder in _folders(home / subdir):
            if subdir == "studio_finetune" and not (folder / META).exists():
                log.debug("%s has no %s: not completed, not registered", folder, META)
                continue
            try:
                described.append((describe(folder), folder.name, alt))
            except Exception as err:  # one broken folder must never hide the others
                log.warning("registry discovery: skipping %s: %s", folder, err)
    return _name(described)


def describe_task(task_dir: Path) -> list[ArtifactRecord]:
    """The merged model and/or adapter of one completed sage-ray task folder."""
    meta = json.loads((task_dir / META).read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{META} is not a JSON object")
    merged = _model_dir(task_dir / MERGED_DIR, meta.get("merged_path"), MODEL_CONFIG)
    adapter = _model_dir(task_dir / LORA_DIR, meta.get("lora_path"), ADAPTER_CONFIG)
    # trained on another node with SAGE_STORAGE: the models are registered by their shared copy
    merged = merged or (task_dir / MERGED_DIR if meta.get("merged_uri") else None)
    adapter = adapter or (task_dir / "lora" if meta.get("lora_uri") else None)
    if merged is None and adapter is None:
        raise ValueError(f"{META} is there but neither lora/ (with {ADAPTER_CONFIG}) nor merged_model/ "
                         "(with config.json) is complete, and no shared copy is recorded")
    adapter_config = _read_json(adapter / ADAPTER_CONFIG) if adapter and adapter.is_dir() else {}
    lora_cfg = (meta.get("config") or {}).get("lora") or {}
    common: ArtifactRecord = {
        "task_id": task_dir.name,
        "base_model": meta.get("base_model") or adapter_config.get("base_model_name_or_path"),
        "created_at": meta.get("completed_at") or _mtime(task_dir / META),
        "chat_template": _template_source(meta),
        "lora_rank": adapter_config.get("r") or lora_cfg.get("r"),
        "target_modules": adapter_config.get("target_modules") or lora_cfg.get("target_modules"),
        "metrics": meta.get("metrics"),
    }
    return _pair(task_dir.name, merged, adapter, common, merged_at=meta.get("merged_at"),
                 uris=(meta.get("merged_uri"), meta.get("lora_uri")))


def describe_legacy(folder: Path) -> list[ArtifactRecord]:
    """The merged model and/or adapter of an older SAGE `finetune_output/<name>/` folder."""
    merged = folder / MERGED_DIR if is_model(folder / MERGED_DIR) else None
    adapter = (folder / "lora_weights" if is_adapter(folder / "lora_weights")
               else newest_checkpoint(folder / "checkpoints"))
    if merged is None and adapter is None:
        raise ValueError("no merged_model/, lora_weights/ or checkpoints/checkpoint-N/ with a model in it")
    adapter_config = _read_json(adapter / ADAPTER_CONFIG) if adapter else {}
    common: ArtifactRecord = {
        "task_id": None,  # not a sage-ray task: no job record, no task id
        "base_model": adapter_config.get("base_model_name_or_path"),
        "created_at": _mtime(merged or adapter),
        "lora_rank": adapter_config.get("r"),
        "target_modules": adapter_config.get("target_modules"),
    }
    return _pair(folder.name, merged, adapter, common)


def describe_base(folder: Path) -> list[ArtifactRecord]:
    """A base model folder kept under `models/`."""
    if not is_model(folder):
        raise ValueError("no config.json: not a model folder")
    return [{"name": folder.name, "kind": "base", "path": str(folder), "base_model": None, "task_id": None,
             "created_at": _mtime(folder / MODEL_CONFIG), "size_bytes": folder_size(folder),
             "chat_template": "model" if has_chat_template(folder) else None}]


def newest_checkpoint(checkpoints: Path) -> Path | None:
    """The `checkpoint-N` with the largest N (as a number) that holds an adapter, or None."""
    numbered = []
    for child in _folders(checkpoints):
        match = _CHECKPOINT.fullmatch(child.name)
        if match:
            numbered.append((int(match[1]), child))
    for _n, child in sorted(numbered, reverse=True):
        if is_adapter(child):
            return child
        log.warning("registry discovery: skipping %s: no %s (an interrupted save?)", child, ADAPTER_CONFIG)
    return None


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` carries a chat template."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(_read_json(config).get("chat_template"))


def folder_size(path: Path) -> int:
    """Bytes in every file under `path` (files that vanish meanwhile count as 0)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _pair(stem: str, merged: Path | None, adapter: Path | None, common: ArtifactRecord,
          merged_at: str | None = None, uris: tuple[str | None, str | None] = (None, None)) -> list[ArtifactRecord]:
    records: list[ArtifactRecord] = []
    if merged is not None:
        created = merged_at or common.get("created_at")
        records.append({**common, "name": stem, "kind": "merged", "path": str(merged), "uri": uris[0],
                        "created_at": created, "size_bytes": _size(merged)})
    if adapter is not None:
        records.append({**common, "name": f"{stem}-lora" if merged else stem, "kind": "lora",
                        "path": str(adapter), "uri": uris[1], "size_bytes": _size(adapter)})
    return records


def _size(folder: Path) -> int | None:
    return folder_size(folder) if folder.is_dir() else None  # only its shared copy exists


def _name(described: list[tuple[list[ArtifactRecord], str, str]]) -> list[ArtifactRecord]:
    """Settle the names: every folder's stem before any derived `-lora` name, so a folder
    called `x-lora` keeps its name; a derived name that clashes gets `-2`, `-3`, ..."""
    taken: set[str] = set()
    stems: list[str | None] = []
    for records, stem, alt in described:
        free = [c for c in ((stem, stem + alt) if alt else (stem,)) if c not in taken]
        stems.append(free[0] if free else None)
        taken.update(free[:1])
        if not free and records:
            log.warning("registry discovery: skipping %s: the name %r is taken", records[0]["path"], stem)
    found: list[ArtifactRecord] = []
    for (records, stem, _alt), new_stem in zip(described, stems):
        for record in records if new_stem is not None else []:
            name = new_stem + record["name"][len(stem):]
            if name != new_stem:
                base, n = name, 2
                while name in taken:
                    name, n = f"{base}-{n}", n + 1
                taken.add(name)
            found.append({**record, "name": name})
    return found


def _folders(parent: Path) -> list[Path]:
    try:
        return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as err:
        log.warning("registry discovery: cannot list %s: %s", parent, err)
        return []


def _model_dir(local: Path, from_meta: str | None, marker: str) -> Path | None:
    # The task's own folder first: SAGE_HOME may have moved since the meta was written.
    for candidate in (local, Path(from_meta) if from_meta else None):
        if candidate is not None and (candidate / marker).is_file():
            return candidate
    return None


def _template_source(meta: dict[str, Any]) -> str | None:
    """"model" when the base model brought its chat template, "default" when training gave it ours."""
    if meta.get("chat_template_source") in ("model", "default"):
        return meta["chat_template_source"]
    base = meta.get("base_model_path")
    if base and Path(base).is_dir():
        return "model" if has_chat_template(Path(base)) else "default"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
