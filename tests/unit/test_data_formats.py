"""Dataset reading and validation: every format, both file layouts, every error message."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from sage_ray.data import (
    FORMATS,
    MAX_DATASET_BYTES,
    Dataset,
    DatasetError,
    Example,
    detect_format,
    load_dataset,
    parse_dataset_bytes,
    to_example,
)

ALPACA = {"instruction": "Add 2 and 3.", "output": "5"}


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def error_for(path: Path, max_bytes: int | None = None) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        load_dataset(path, max_bytes=max_bytes)
    return info.value


def check(err: DatasetError, name: str, location: str | None, field: str | None = None,
          *words: str) -> None:
    """The message names the file, the location, the field, and gives a fix."""
    msg = str(err)
    assert name in msg and err.path.endswith(name)
    assert "Fix: " in msg and err.fix
    if location is not None:
        assert f"{name}, {location}:" in msg
        assert err.location == location
    if field is not None:
        assert err.field == field
        assert field in msg
    for word in words:
        assert word in msg, (word, msg)


# ---- every format parses to the exact messages --------------------------------------

CASES = [
    ("alpaca", {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
     [{"role": "user", "content": "Translate to French.\n\ncat"},
      {"role": "assistant", "content": "chat"}]),
    ("alpaca", {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
      {"role": "assistant", "content": "Hi!"}]),
    ("alpaca", {"instruction": "Say hi.", "input": None, "output": "Hi!", "id": 7},
     [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
    ("qa", {"question": "Capital of France?", "answer": "Paris."},
     [{"role": "user", "content": "Capital of France?"},
      {"role": "assistant", "content": "Paris."}]),
    ("qa", {"question": "Who wrote it?", "answer": "Ada.", "context": "Ada wrote it."},
     [{"role": "user", "content": "Context:\nAda wrote it.\n\nQuestion: Who wrote it?"},
      {"role": "assistant", "content": "Ada."}]),
    ("conversations", {"messages": [{"role": "system", "content": "S"},
                                    {"role": "user", "content": "U1"},
                                    {"role": "assistant", "content": "A1"},
                                    {"role": "user", "content": "U2"},
                                    {"role": "assistant", "content": "A2"}]},
     [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
      {"role": "assistant", "content": "A2"}]),
    ("conversations", {"conversations": [{"role": "user", "content": "U", "name": "x"},
                                         {"role": "assistant", "content": "A"}]},
     [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]),
    ("sharegpt", {"conversations": [{"from": "system", "value": "S"},
                                    {"from": "human", "value": "H"},
                                    {"from": "gpt", "value": "G"}]},
     [{"role": "system", "content": "S"}, {"role": "user", "content": "H"},
      {"role": "assistant", "content": "G"}]),
]


@pytest.mark.parametrize("layout", ["jsonl", "array"])
@pytest.mark.parametrize("fmt,record,messages", CASES)
def test_format_parses_to_messages(tmp_path, layout, fmt, record, messages):
    content = jsonl(record, record) if layout == "jsonl" else json.dumps([record, record])
    ds = load_dataset(write(tmp_path, "d.json", content))
    assert ds.format == fmt
    assert ds.examples == [Example(messages=messages), Example(messages=messages)]


def test_text_format(tmp_path):
    ds = load_dataset(write(tmp_path, "t.jsonl", jsonl({"text": "Once upon a time."})))
    assert ds.format == "text"
    assert ds.examples == [Example(text="Once upon a time.")]


def test_dataset_summary_and_sha(tmp_path):
    import hashlib

    raw = jsonl(ALPACA, ALPACA, ALPACA).encode()
    path = write(tmp_path, "train.jsonl", raw)
    ds = load_dataset(path)
    assert isinstance(ds, Dataset) and len(ds) == 3
    assert ds.summary() == {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest(),
                            "records": 3, "format": "alpaca"}


def test_jsonl_blank_lines_crlf_and_bom(tmp_path):
    raw = b"\xef\xbb\xbf" + ("\r\n\r\n" + json.dumps(ALPACA) + "\r\n   \r\n" +
                             json.dumps(ALPACA) + "\r\n").encode()
    ds = load_dataset(write(tmp_path, "bom.jsonl", raw))
    assert len(ds.examples) == 2 and ds.format == "alpaca"


def test_bom_json_array(tmp_path):
    ds = load_dataset(write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps([ALPACA]).encode()))
    assert len(ds) == 1


def test_json_extension_with_jsonl_content(tmp_path):
    assert len(load_dataset(write(tmp_path, "d.json", jsonl(ALPACA, ALPACA)))) == 2


def test_pretty_printed_array(tmp_path):
    assert len(load_dataset(write(tmp_path, "d.json", json.dumps([ALPACA] * 3, indent=2)))) == 3


def test_sharegpt_empty_record_is_reported_as_bad_not_mixed(tmp_path):
    good = {"conversations": [{"from": "human", "value": "H"}, {"from": "gpt", "value": "G"}]}
    err = error_for(write(tmp_path, "s.jsonl", jsonl(good, {"conversations": []})))
    check(err, "s.jsonl", "line 2", "conversations", "is empty")


def test_parse_dataset_bytes(tmp_path):
    ds = parse_dataset_bytes(jsonl(ALPACA).encode(), "upload.jsonl")
    assert ds.path == Path("upload.jsonl") and ds.format == "alpaca" and len(ds) == 1
    with pytest.raises(DatasetError) as info:
        parse_dataset_bytes(b'{"instruction": "x"}\n', "upload.jsonl")
    check(info.value, "upload.jsonl", "line 1", "output", "missing")


def test_detect_format_and_to_example():
    assert FORMATS == ("alpaca", "qa", "conversations", "sharegpt", "text", "preference", "openai_dpo", "kto")
    assert detect_format(ALPACA) == "alpaca"
    assert detect_format({"question": "q", "answer": "a"}) == "qa"
    assert detect_format({"messages": []}) == "conversations"
    assert detect_format({"conversations": [{"from": "human", "value": "x"}]}) == "sharegpt"
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"prompt": "x"}) is None
    ex = to_example(ALPACA, "alpaca")
    assert ex.messages[-1] == {"role": "assistant", "content": "5"} and ex.text is None
    with pytest.raises(DatasetError) as info:
        to_example({"text": 1}, "text", path="x.jsonl", location="line 9")
    check(info.value, "x.jsonl", "line 9", "text", "got a number")


def test_error_pickles_and_dicts():
    err = DatasetError("d.json", "field 'output' is empty", "put text in it", "line 3", "output")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) == "d.json, line 3: field 'output' is empty. Fix: put text in it."
    assert back.field == "output" and err.to_dict()["location"] == "line 3"
    assert isinstance(err, ValueError)


# ---- errors -------------------------------------------------------------------------

def test_bad_json_jsonl_line_and_column(tmp_path):
    content = jsonl(ALPACA, ALPACA) + '{"instruction": "x", "output": "y",}\n'
    err = error_for(write(tmp_path, "bad.jsonl", content))
    check(err, "bad.jsonl", "line 3, column 36", None, "invalid JSON", "double quotes")


def test_bad_json_array_line_and_column(tmp_path):
    content = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]'
    err = error_for(write(tmp_path, "bad.json", content))
    check(err, "bad.json", "line 3, column 23", None, "Expecting ','")


def test_two_objects_on_one_jsonl_line(tmp_path):
    err = error_for(write(tmp_path, "two.jsonl", json.dumps(ALPACA) + " " + json.dumps(ALPACA)))
    column = len(json.dumps(ALPACA)) + 2  # points at the second object, after the space
    check(err, "two.jsonl", f"line 1, column {column}", None, "one JSON object on each line")


def test_pretty_printed_objects_without_array(tmp_path):
    content = json.dumps(ALPACA, indent=2) + "\n" + json.dumps(ALPACA, indent=2)
    err = error_for(write(tmp_path, "pretty.json", content))
    check(err, "pretty.json", "line 1, column 2", None, "must fit on one line")


def test_single_wrapper_object(tmp_path):
    err = error_for(write(tmp_path, "wrap.json", json.dumps({"data": [ALPACA]}, indent=2)))
    check(err, "wrap.json", "line 1", None, "under 'data'", "JSON array")


@pytest.mark.parametrize("content,word", [("", "empty"), ("  \n\n\t \n", "whitespace")])
def test_empty_file(tmp_path, content, word):
    check(error_for(write(tmp_path, "e.jsonl", content)), "e.jsonl", None, None, word)


def test_empty_array(tmp_path):
    err = error_for(write(tmp_path, "e.json", " [ ] "))
    check(err, "e.json", None, None, "array is empty")


def test_not_utf8(tmp_path):
    raw = (jsonl(ALPACA, ALPACA) + '{"instruction": "caf').encode() + b"\xe9" + b'", "output": "x"}\n'
    err = error_for(write(tmp_path, "latin.jsonl", raw))
    offset = len(jsonl(ALPACA, ALPACA)) + len('{"instruction": "caf')
    check(err, "latin.jsonl", "line 3", None, f"offset {offset}", "0xe9", "UTF-8")


def test_utf16(tmp_path):
    err = error_for(write(tmp_path, "w.json", json.dumps([ALPACA]).encode("utf-16")))
    check(err, "w.json", None, None, "UTF-16", "UTF-8")


@pytest.mark.parametrize("layout,loc", [("jsonl", "line 2"), ("array", "record 2")])
@pytest.mark.parametrize("bad,kind", [("just text", "a string"), ([1, 2], "a list"),
                                      (None, "null"), (3, "a number")])
def test_record_not_an_object(tmp_path, layout, loc, bad, kind):
    content = jsonl(ALPACA, bad) if layout == "jsonl" else json.dumps([ALPACA, bad])
    err = error_for(write(tmp_path, "r.json", content))
    check(err, "r.json", loc, None, f"is {kind}, not an object")


@pytest.mark.parametrize("record,field,words", [
    ({"instruction": "x"}, "output", ["missing required field 'output'"]),
    ({"output": "y", "instruction": 5}, "instruction", ["must be a string, got a number"]),
    ({"instruction": "x", "output": None}, "output", ["got null"]),
    ({"instruction": "x", "output": ["a"]}, "output", ["got a list"]),
    ({"instruction": "x", "output": {"a": 1}}, "output", ["got an object"]),
    ({"instruction": "x", "output": True}, "output", ["got a boolean"]),
    ({"instruction": "x", "output": "   "}, "output", ["is empty"]),
    ({"instruction": "x", "input": 3, "output": "y"}, "input", ["got a number"]),
    ({"instruction": "x", "output": "y", "system": []}, "system", ["got a list"]),
    ({"question": "q"}, "answer", ["missing required field 'answer'"]),
    ({"question": "q", "answer": ""}, "answer", ["is empty"]),
    ({"question": 1, "answer": "a"}, "question", ["got a number"]),
    ({"question": "q", "answer": "a", "context": 2}, "context", ["got a number"]),
    ({"text": ""}, "text", ["is empty"]),
    ({"text": 42}, "text", ["got a number"]),
])
@pytest.mark.parametrize("layout,loc", [("jsonl", "line 3"), ("array", "record 3")])
def test_field_errors(tmp_path, layout, loc, record, field, words):
    ok = {"alpaca": ALPACA, "qa": {"question": "q", "answer": "a"}, "text": {"text": "t"}}
    good = ok[detect_format(record)]
    content = jsonl(good, good, record) if layout == "jsonl" else json.dumps([good, good, record])
    check(error_for(write(tmp_path, "f.json", content)), "f.json", loc, field,
          f"'{field}'", *words)


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("record,field,words", [
    ({"messages": "hi"}, "messages", ["must be a list", "got a string"]),
    ({"messages": []}, "messages", ["is empty"]),
    ({"messages": [U]}, "messages", ["no assistant turn"]),
    ({"messages": [U, {"role": "assistant", "content": "  "}]}, "messages", ["no assistant"]),
    ({"messages": [U, A, "oops"]}, "messages[2]", ["must be an object, got a string"]),
    ({"messages": [U, {"role": "bot", "content": "x"}]}, "messages[1].role",
     ["'bot'", "'system', 'user', 'assistant'"]),
    ({"messages": [U, {"content": "x"}]}, "messages[1].role", ["missing"]),
    ({"messages": [U, A, {"role": "user", "content": 5}]}, "messages[2].content",
     ["a number, not a string"]),
    ({"messages": [U, {"role": "assistant"}]}, "messages[1].content", ["missing"]),
    ({"messages": [U, {"role": "system", "content": "s"}, A]}, "messages[1].role",
     ["only the first turn"]),
    ({"conversations": [{"from": "human", "value": "h"}, {"from": "bot", "value": "b"}]},
     "conversations[1].from", ["'bot'", "'human', 'gpt', 'system'"]),
    ({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": None}]},
     "conversations[1].value", ["null, not a string"]),
])
def test_conversation_errors(tmp_path, record, field, words):
    content = jsonl({"messages": [U, A]}, record)
    if "conversations" in record:
        good = {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}
        content = jsonl(good, record)
    check(error_for(write(tmp_path, "c.jsonl", content)), "c.jsonl", "line 2", field, *words)


@pytest.mark.parametrize("layout,loc", [("jsonl", "line 2"), ("array", "record 2")])
def test_unknown_format(tmp_path, layout, loc):
    bad = {"prompt": "p", "completion": "c"}
    content = jsonl(ALPACA, bad) if layout == "jsonl" else json.dumps([ALPACA, bad])
    err = error_for(write(tmp_path, "u.json", content))
    check(err, "u.json", loc, None, "'prompt', 'completion'", "alpaca", "qa", "sharegpt",
          '"instruction"', "'prompt' -> 'instruction'")


def test_unknown_format_empty_object(tmp_path):
    check(error_for(write(tmp_path, "u.json", "[{}]")), "u.json", "record 1", None, "none")


def test_mixed_formats_jsonl(tmp_path):
    records = [ALPACA] * 15 + [{"question": "q", "answer": "a"}] + [ALPACA] * 2 + \
              [{"question": "q2", "answer": "a2"}]
    err = error_for(write(tmp_path, "mix.jsonl", jsonl(*records)))
    check(err, "mix.jsonl", None, None,
          "mixes formats: alpaca (17 records, first at line 1), "
          "qa (2 records, first at line 16)", "one format per file")


def test_mixed_formats_array(tmp_path):
    records = [{"text": "t"}, {"messages": [U, A]}, {"messages": [U, A]}]
    err = error_for(write(tmp_path, "mix.json", json.dumps(records)))
    check(err, "mix.json", None, None, "text (1 record, first at record 1)",
          "conversations (2 records, first at record 2)")


def test_oversized_file_checked_before_reading(tmp_path, monkeypatch):
    path = write(tmp_path, "big.jsonl", jsonl(*[ALPACA] * 100))
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read before size check"))
    err = error_for(path, max_bytes=1000)
    check(err, "big.jsonl", None, None, "over the limit", "SAGE_MAX_DATASET_MB")


def test_size_limit_env_var_read_at_call_time(tmp_path, monkeypatch):
    assert MAX_DATASET_BYTES == 512 * 1024 * 1024
    path = write(tmp_path, "big.jsonl", jsonl(*[ALPACA] * 40000))  # ~1.6 MB
    monkeypatch.setenv("SAGE_MAX_DATASET_MB", "1")
    check(error_for(path), "big.jsonl", None, None, "1.0 MB", "SAGE_MAX_DATASET_MB=2")
    with pytest.raises(DatasetError, match="SAGE_MAX_DATASET_MB"):
        parse_dataset_bytes(path.read_bytes(), "up.jsonl")
    monkeypatch.setenv("SAGE_MAX_DATASET_MB", "3")
    assert len(load_dataset(path)) == 40000
    monkeypatch.setenv("SAGE_MAX_DATASET_MB", "lots")
    with pytest.raises(ValueError, match="SAGE_MAX_DATASET_MB"):
        load_dataset(path)


def test_missing_file_and_folder(tmp_path):
    check(error_for(tmp_path / "nope.jsonl"), "nope.jsonl", None, None, "does not exist")
    check(error_for(tmp_path), tmp_path.name, None, None, "folder")
