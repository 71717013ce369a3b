"""cluster.yaml: valid for the Ray cluster launcher (the schema that ships with Ray), and secure by default."""

from __future__ import annotations

import copy
import re

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from .conftest import REPO

pytestmark = pytest.mark.unit

CLUSTER_YAML = REPO / "cluster.yaml"


def _load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(raw: dict) -> dict:
    """What `ray up` does before it contacts the cloud: merge the provider's defaults, then validate."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_cluster_yaml_validates_against_rays_schema():
    config = _prepared(_load())
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] == "head"


def test_schema_check_is_not_vacuous():
    """The same validation rejects a config with a wrong type or an unknown key."""
    bad = _load()
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="four"):
        _prepared(bad)
    bad = _load()
    bad["auth"]["ssh_password"] = "hunter2"
    with pytest.raises(jsonschema.ValidationError, match="ssh_password"):
        _prepared(bad)


def test_cpu_head_and_gpu_workers_autoscaling_from_zero():
    config = _prepared(_load())
    head = config["available_node_types"]["head"]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] >= 1, "GPU capacity must be stated for scaling up from zero"


def test_setup_installs_this_project_and_shared_storage_on_every_node():
    config = _prepared(_load())
    assert config["file_mounts"]["/home/ubuntu/smn"] == "."
    for node in ("head_setup_commands", "worker_setup_commands"):  # setup_commands are merged into both
        cmds = "\n".join(config[node])
        assert "scripts/setup.sh" in cmds, node
        assert re.search(r"mount -t nfs4 .* /mnt/smn", cmds), node
        assert "smn/.venv/bin" in cmds, node  # the job driver's python is the head's PATH python
    assert ".gitignore" in config["rsync_filter"]  # .venv and results stay on the laptop


def test_security_defaults():
    config = _prepared(_load())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    for node in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[node] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), node
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
