"""Read a dataset file (JSON array or JSONL), check it, and return normalised examples."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_ray import env
from sage_ray.data.errors import DatasetError, json_type
from sage_ray.data.formats import KINDS, Example, detect_format, to_example, unknown_format_error

MAX_DATASET_BYTES = 512 * 1024 * 1024
MAX_DATASET_ENV = "SAGE_MAX_DATASET_MB"

_BOM = b"\xef\xbb\xbf"
_JSON_SPACE = " \t\r\n"  # JSON's whitespace; str.strip() would also eat e.g. U+00A0
_SHAPE_FIX = ("write the records as a JSON array [{...}, {...}] or as JSONL, "
              "one JSON object per line")


@dataclass
class Dataset:
    """A validated dataset: one format, at least one example."""

    path: Path
    format: str
    """One of FORMATS."""
    examples: list[Example]
    sha256: str
    """Of the file's bytes, so a task records exactly what it trained on."""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def kind(self) -> str:
        """What the records train: "sft", "pairs" (chosen/rejected) or "labelled" (KTO)."""
        return KINDS[self.format]

    def summary(self) -> dict[str, Any]:
        """What finetune_meta.json records about the dataset."""
        return {"path": str(self.path), "sha256": self.sha256,
                "records": len(self.examples), "format": self.format}


def max_dataset_bytes(max_bytes: int | None = None) -> int:
    """The size limit: `max_bytes`, else $SAGE_MAX_DATASET_MB (read now), else 512 MiB."""
    if max_bytes is not None:
        return max_bytes
    raw = env.value(MAX_DATASET_ENV, "")
    if not raw:
        return MAX_DATASET_BYTES
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if mb <= 0:
        raise ValueError(f"{MAX_DATASET_ENV} must be a positive number of megabytes, "
                         f"got {raw!r}")
    return int(mb * 1024 * 1024)


def _check_size(name: str, size: int, limit: int) -> None:
    if size > limit:
        need = int(size / 1024 / 1024) + 1
        raise DatasetError(
            name, f"the file is {size / 1024 / 1024:.1f} MB ({size} bytes), over the "
            f"limit of {limit / 1024 / 1024:.1f} MB",
            f"split it into smaller files, or raise the limit with "
            f"{MAX_DATASET_ENV}={need} (megabytes)")


def load_dataset(path: str | Path, *, method: str | None = "sft", max_bytes: int | None = None) -> Dataset:
    """Read, validate and normalise the dataset at `path` for training `method` (sft, dpo,
    orpo, kto; None accepts any); raises DatasetError."""
    name = str(path)
    limit = max_dataset_bytes(max_bytes)
    try:
        size = os.stat(path).st_size  # before reading: never load an oversized file
    except FileNotFoundError:
        raise DatasetError(name, "the file does not exist",
                           "check the path (relative paths start from the current "
                           "directory)") from None
    if os.path.isdir(path):
        raise DatasetError(name, "this is a folder, not a file",
                           "give the path of a .json or .jsonl file")
    _check_size(name, size, limit)
    return parse_dataset_bytes(Path(path).read_bytes(), name, method=method, max_bytes=limit)


def parse_dataset_bytes(data: bytes, name: str, *, method: str | None = "sft",
                        max_bytes: int | None = None) -> Dataset:
    """Validate and normalise a dataset held in memory (an upload); `name` is used in
    messages and as the dataset's path. `method` as for load_dataset. Raises DatasetError."""
    _check_size(name, len(data), max_dataset_bytes(max_bytes))
    records = _parse(_decode(data, name), name)
    fmt = _single_format(records, name)
    if method is not None:
        check_method(name, fmt, method, records[0][0])
    examples = [to_example(rec, fmt, path=name, location=loc) for loc, rec in records]
    if method == "orpo":  # TRL's ORPO renders no per-record tools: they would be dropped silently
        for (loc, _), example in zip(records, examples):
            if example.tools:
                raise DatasetError(name, "the record has tools, which method 'orpo' cannot render",
                                   "use --method dpo or kto for records with tools", loc, "tools")
    return Dataset(Path(name), fmt, examples, hashlib.sha256(data).hexdigest())


# The kinds of data each training method takes (KTO also takes pairs: chosen is desirable,
# rejected undesirable, as TRL's unpair_preference_dataset does).
METHOD_KINDS = {"sft": ("sft",), "dpo": ("pairs",), "orpo": ("pairs",), "kto": ("labelled", "pairs")}
_KIND_TEXT = {
    "sft": ("supervised examples (one reply per prompt, no chosen/rejected or label)",
            "use --method sft (method: sft), or give preference data"),
    "pairs": ("preference data (chosen/rejected pairs)", "use --method dpo (or orpo, or kto)"),
    "labelled": ("KTO data (replies with a true/false 'label')", "use --method kto"),
}


def check_method(name: str, fmt: str, method: str, location: str) -> None:
    """Refuse data that `method` would train on wrongly (KTO data as SFT, SFT data as DPO)."""
    if method not in METHOD_KINDS:
        raise ValueError(f"unknown training method {method!r}; expected one of {tuple(METHOD_KINDS)}")
    kind = KINDS[fmt]
    if kind in METHOD_KINDS[method]:
        return
    what, fix = _KIND_TEXT[kind]
    needs = " or ".join(_KIND_TEXT[k][0] for k in METHOD_KINDS[method])
    harm = "; as SFT, the replies labelled false would be learned too" if kind == "labelled" else ""
    raise DatasetError(name, f"this looks like {what} (format {fmt}), but method {method!r} "
                       f"trains on {needs}{harm}", fix, location, "method")


def _decode(data: bytes, name: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(name, "the file is UTF-16 encoded (it starts with a UTF-16 "
                           "byte order mark)", "re-save the file as UTF-8")
    skip = len(_BOM) if data.startswith(_BOM) else 0  # editors on Windows add a BOM
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise DatasetError(
            name, f"the file is not valid UTF-8: byte 0x{data[offset]:02x} at byte offset "
            f"{offset} cannot be decoded",
            "re-save the file as UTF-8 (in your editor: Save As, encoding UTF-8; or "
            "`iconv -f latin1 -t utf-8 in.json > out.json`)", f"line {line}") from None
    if not text.strip(_JSON_SPACE):
        what = "empty" if not text else "only whitespace"
        raise DatasetError(name, f"the file is {what}, it holds no records",
                           f"add training records: {_SHAPE_FIX}")
    return text


def _parse(text: str, name: str) -> list[tuple[str, Any]]:
    """(location, record) pairs; '[' first means a JSON array, anything else JSONL."""
    if text.lstrip(_JSON_SPACE).startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _syntax_error(name, exc, exc.lineno, exc.colno, jsonl=False) from None
        if not value:
            raise DatasetError(name, "the JSON array is empty, it holds no records",
                               "add at least one record object inside [ ]")
        return [(f"record {i}", rec) for i, rec in enumerate(value, 1)]
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip(_JSON_SPACE):
            continue  # blank lines are allowed between records
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            if not records:
                _reject_single_object(text, name)
            raise _syntax_error(name, exc, number, exc.colno, jsonl=True,
                                line=line) from None
    return records


def _syntax_error(name: str, exc: json.JSONDecodeError, line_no: int, col: int, *,
                  jsonl: bool, line: str = "") -> DatasetError:
    """Bad JSON, with a hint for the usual causes of each decoder message."""
    msg = exc.msg
    if jsonl and line.strip(_JSON_SPACE) in ("{", "["):  # a pretty-printed record
        fix = f"a JSONL record must fit on one line; or {_SHAPE_FIX}"
    elif msg.startswith("Expecting property name"):
        fix = "put keys in double quotes and leave no comma after the last item"
    elif msg.startswith("Unterminated string") or msg.startswith("Invalid control"):
        fix = "close strings with a double quote; write line breaks inside strings as \\n"
    elif msg.startswith("Extra data"):
        fix = ("put exactly one JSON object on each line" if jsonl
               else "remove what follows the array's closing ]")
    else:
        fix = "correct the JSON syntax at that spot (strings in double quotes, " \
              "commas between items)"
    return DatasetError(name, f"invalid JSON: {msg}", fix, f"line {line_no}, column {col}")


def _reject_single_object(text: str, name: str) -> None:
    """A pretty-printed single object (often a wrapper like {"data": [...]}) is not
    JSONL; say so instead of reporting a syntax error on its first line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list) and v
                 and all(isinstance(r, dict) for r in v)]
        hint = f" (the records seem to be under '{lists[0]}')" if lists else ""
        raise DatasetError(name, f"the file is one JSON object spread over several lines, "
                           f"not a list of records{hint}", _SHAPE_FIX, "line 1")


def _single_format(records: list[tuple[str, Any]], name: str) -> str:
    """The file's one format; raises on non-objects, unknown and mixed formats."""
    for loc, rec in records:
        if not isinstance(rec, dict):
            raise DatasetError(name, f"the record is {json_type(rec)}, not an object",
                               'write each record as a JSON object, e.g. '
                               '{"instruction": "...", "output": "..."}', loc)
        if detect_format(rec) is None:
            raise unknown_format_error(rec, name, loc)
    formats = [detect_format(rec) for _, rec in records]
    if "sharegpt" in formats:  # undecided "conversations" records follow the file
        formats = [detect_format(rec, chat_default="sharegpt") for _, rec in records]
    found: dict[str, list] = {}  # format -> [count, first location], in file order
    for (loc, _), fmt in zip(records, formats):
        found.setdefault(fmt, [0, loc])[0] += 1
    if len(found) > 1:
        parts = ", ".join(f"{fmt} ({n} record{'s' * (n != 1)}, first at {loc})"
                          for fmt, (n, loc) in found.items())
        raise DatasetError(name, f"the file mixes formats: {parts}",
                           "use one format per file")
    return next(iter(found))
