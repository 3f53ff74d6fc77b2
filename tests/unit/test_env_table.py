"""The one table of environment variables: complete, documented, and forwarded as it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sage_ray import env

ROOT = Path(__file__).resolve().parents[2]


def test_every_sage_variable_the_code_names_is_in_the_table_and_the_readme():
    named = {name for path in (ROOT / "sage_ray").rglob("*.py")
             for name in re.findall(r"\bSAGE_[A-Z][A-Z0-9_]*\b", path.read_text())}
    assert named and named <= set(env.VARS), sorted(named - set(env.VARS))
    readme = (ROOT / "README.md").read_text()
    for var in env.TABLE:
        assert re.search(rf"^\| `{var.name}` \| {var.reach} \|", readme, re.M), f"README lacks the row of {var.name}"


def test_forwarded_settings_follow_their_reach(monkeypatch):
    monkeypatch.setenv("SAGE_HOME", "/data/sage")
    monkeypatch.setenv("SAGE_STORAGE", "s3://bucket/sage")
    monkeypatch.setenv("SAGE_STUDIO_API_KEY", "secret")
    monkeypatch.setenv("SAGE_MAX_CONCURRENT_JOBS", " ")  # blank: not a setting
    assert env.forwarded("everywhere") == {"SAGE_STORAGE": "s3://bucket/sage"}
    assert env.forwarded("jobs") == {"SAGE_HOME": "/data/sage", "SAGE_STORAGE": "s3://bucket/sage"}
    assert env.value("SAGE_MAX_CONCURRENT_JOBS", "4") == "4"


def test_an_unknown_name_is_refused():
    with pytest.raises(KeyError, match="not in sage_ray.env.TABLE"):
        env.value("SAGE_NOT_A_SETTING")
