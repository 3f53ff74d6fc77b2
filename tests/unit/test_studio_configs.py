"""The Serve configs shipped in configs/ are valid for Serve and for StudioSettings."""

from __future__ import annotations

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
    assert "hunter2" not in yaml.safe_dump(config)
    assert StudioSettings(**config["applications"][0]["args"]).check_key("hunter2")
