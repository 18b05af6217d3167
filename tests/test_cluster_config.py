"""cluster.yaml against Ray's own cluster-config schema (no cloud access), and against the README."""
import copy
import re

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))  # what `ray up` does, minus the cloud
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resourcez"] = {}
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        validate_config(prepare_config(broken))


def test_gpu_workers_setup_and_entrypoints_agree_with_the_readme(cluster):
    readme = (REPO / "README.md").read_text()
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] >= 1
    assert any("[gpu" in c for c in cluster["setup_commands"])
    for module in set(re.findall(r"python -m (jobs\.\w+)", readme)):
        assert (REPO / (module.replace(".", "/") + ".py")).exists(), module
    assert "ray job submit" in readme and "cluster.yaml" in readme
    text = (REPO / "cluster.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "secret" not in text.replace("never", "")
