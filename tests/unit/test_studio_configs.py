"""The Serve configs shipped in configs/ are valid for Serve and for StudioSettings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from sage_ray.serve.deploy import studio_config
from sage_ray.serve.settings import LLM_DEPLOYMENT, StudioSettings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["studio.yaml", "studio_cluster.yaml"])
def test_shipped_serve_configs_validate(name):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((CONFIGS / name).read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    settings = StudioSettings(**app["args"])
    assert config["http_options"]["host"] == "127.0.0.1"
    llm = next(d for d in app["deployments"] if d["name"] == LLM_DEPLOYMENT)
    assert llm["user_config"]["model"] == settings.model


def test_generated_config_keeps_only_a_hash_of_the_key():
    from ray.serve.schema import ServeDeploySchema

    config = studio_config(StudioSettings(model="tiny", api_key="hunter2"), port=8123)
    ServeDeploySchema.model_validate(config)
    text = yaml.safe_dump(config)
    assert "hunter2" not in text and hashlib.sha256(b"hunter2").hexdigest() not in text  # no fast, unsalted hash
    stored = config["applications"][0]["args"]["api_key_hash"]
    assert stored.startswith("scrypt$") and stored != StudioSettings(api_key="hunter2").api_key_hash  # salted
    settings = StudioSettings(**config["applications"][0]["args"])
    assert settings.check_key("hunter2") and settings.check_key("hunter2")  # the second from memory
    assert not settings.check_key("hunter3") and not settings.check_key(None) and not settings.check_key("")
    assert not StudioSettings(api_key_hash="sha256-of-something").check_key("x")  # an unknown format matches nothing


def test_a_public_host_needs_an_api_key_or_insecure(monkeypatch):
    from typer.testing import CliRunner

    from sage_ray.cli import app

    monkeypatch.delenv("SAGE_STUDIO_API_KEY", raising=False)
    refused = CliRunner().invoke(app, ["studio", "start", "--host", "0.0.0.0", "--no-browser"])
    assert refused.exit_code == 1 and "--api-key" in refused.output and "--insecure" in refused.output


def test_hub_models_are_allowed_on_a_loopback_studio_only_unless_set(monkeypatch):
    assert StudioSettings().hub_allowed()  # a laptop's Studio: the user's own machine downloads
    assert not StudioSettings(allowed_hosts=["*"]).hub_allowed()  # what `--host` off loopback sets
    monkeypatch.setenv("SAGE_STUDIO_ALLOW_HUB", "1")
    assert StudioSettings.from_env(allowed_hosts=["*"]).hub_allowed()
    monkeypatch.setenv("SAGE_STUDIO_ALLOW_HUB", "0")
    assert not StudioSettings.from_env().hub_allowed()
    monkeypatch.setenv("SAGE_STUDIO_ALLOW_HUB", "maybe")
    with pytest.raises(ValueError, match="allow_hub"):
        StudioSettings.from_env()


def test_generated_config_forwards_the_storage_settings_but_no_secret(monkeypatch):
    """Replicas on other nodes fetch shared models: they get SAGE_STORAGE and the endpoint
    through the app's runtime_env; AWS keys in this shell are not copied into the config."""
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("SAGE_STORAGE", "s3://bucket/sage")
    monkeypatch.setenv("SAGE_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-to-be-copied")
    config = studio_config(StudioSettings(model="tiny"))
    ServeDeploySchema.model_validate(config)
    env = config["applications"][0]["runtime_env"]["env_vars"]
    assert env["SAGE_STORAGE"] == "s3://bucket/sage" and env["SAGE_S3_ENDPOINT"] == "http://127.0.0.1:9000"
    assert "not-to-be-copied" not in yaml.safe_dump(config)
    for name in ("SAGE_STORAGE", "SAGE_S3_ENDPOINT"):
        monkeypatch.delenv(name)
    assert "runtime_env" not in studio_config(StudioSettings(model="tiny"))["applications"][0]


def test_a_model_only_in_shared_storage_is_checked_without_fetching(tmp_path):
    from sage_ray.serve.resolve import ModelRefError, spec_of

    gone = {"name": "t", "kind": "merged", "path": str(tmp_path / "gone")}
    with pytest.raises(ModelRefError, match="folder is gone") as err:
        spec_of(gone, fetch=False)
    assert err.value.http_status == 410
    spec = spec_of({**gone, "uri": "s3://bucket/sage/studio_finetune/t/merged_model"}, fetch=False)
    assert spec.path == "s3://bucket/sage/studio_finetune/t/merged_model"  # nothing was downloaded
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "finetune").glob("*.yaml")))
def test_shipped_finetune_configs_load_and_their_data_suits_their_method(name, monkeypatch):
    from sage_ray.config import load_train_config
    from sage_ray.data import load_dataset

    monkeypatch.chdir(CONFIGS.parent)  # the configs name their data relative to the repository
    cfg = load_train_config(CONFIGS / "finetune" / name)
    assert len(load_dataset(cfg.data, method=cfg.method)) > 0
