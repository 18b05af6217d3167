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
    import tomllib

    readme = (REPO / "README.md").read_text()
    text = (REPO / "cluster.yaml").read_text()
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] >= 1
    for node in cluster["available_node_types"].values():  # the README names the instance types it documents
        assert f"`{node['node_config']['InstanceType']}`" in readme
    # setup installs this checkout (mounted from the repo root) with extras that exist
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "." in cluster["file_mounts"].values()
    installs = [c for c in cluster["setup_commands"] if "pip install" in c and "[" in c]
    assert installs, cluster["setup_commands"]
    for cmd in installs:
        wanted = re.search(r"\[([\w,]+)\]", cmd).group(1).split(",")
        assert "gpu" in wanted and set(wanted) <= set(extras), (cmd, sorted(extras))
    assert "`gpu` and\n`s3` extras" in readme or "`gpu` and `s3` extras" in readme
    # every job the README or cluster.yaml names exists, with the example config it names
    modules = set(re.findall(r"python -m (jobs\.\w+)", readme + text))
    modules |= {f"jobs.{m}" for group in re.findall(r"python -m jobs\.\{([\w,]+)\}", readme) for m in group.split(",")}
    assert {"jobs.encode", "jobs.update", "jobs.index", "jobs.storage"} <= modules
    for module in modules:
        assert (REPO / (module.replace(".", "/") + ".py")).exists(), module
    for example in set(re.findall(r"jobs/examples/[\w.]+\.yaml", readme + text)):
        assert (REPO / example).exists(), example
    submits = [line for line in (readme + text).splitlines() if re.match(r"\s*#?\s*ray job submit ", line)]
    assert submits and all("--working-dir ." in line for line in submits), submits
    # credentials and exposure: no secrets in the file, the job API not bound to every interface
    assert "aws_secret_access_key" not in text.lower() and "secret" not in text.lower().replace("never", "")
    assert "0.0.0.0" not in text
