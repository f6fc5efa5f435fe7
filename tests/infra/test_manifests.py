"""KubeRay manifests: valid against the KubeRay CRD schemas, no misspelt key, and a job file that
the pipeline's own configuration loader accepts, at the path the entrypoint reads."""

from __future__ import annotations

import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.run import add_arguments
from pipeline.config_io import config_from_dict

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((ROOT / "infra").glob("*.yaml"))
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}


def documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def crd_schema(kind: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS}")
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _jsonschema(version["schema"]["openAPIV3Schema"])


def _jsonschema(node):
    """OpenAPI v3 -> JSON schema: int-or-string becomes a type union."""
    if isinstance(node, dict):
        node = {k: _jsonschema(v) for k, v in node.items()}
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("anyOf", None)
            node["type"] = ["integer", "string"]
        return node
    if isinstance(node, list):
        return [_jsonschema(v) for v in node]
    return node


def unknown_keys(value, schema: dict, where: str = "") -> list[str]:
    """Keys the schema does not declare (the CRDs allow them, so a typo would pass validation)."""
    if isinstance(value, list) and "items" in schema:
        return [k for i, v in enumerate(value) for k in unknown_keys(v, schema["items"], f"{where}[{i}]")]
    if not isinstance(value, dict) or "properties" not in schema or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    for key, v in value.items():
        if key not in schema["properties"]:
            out.append(f"{where}.{key}")
        else:
            out += unknown_keys(v, schema["properties"][key], f"{where}.{key}")
    return out


def ray_jobs() -> list[dict]:
    """Every RayJob spec, including the job template of each RayCronJob."""
    docs = documents()
    return ([d["spec"] for d in docs if d["kind"] == "RayJob"]
            + [d["spec"]["jobTemplate"] for d in docs if d["kind"] == "RayCronJob"])


def test_there_are_manifests_for_a_job_and_a_nightly_run():
    kinds = [d["kind"] for d in documents()]
    assert "RayJob" in kinds and "RayCronJob" in kinds and "ConfigMap" in kinds


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_valid_against_the_kuberay_crd_with_no_unknown_key(kind):
    schema = crd_schema(kind)
    docs = [d for d in documents() if d["kind"] == kind]
    assert docs
    for doc in docs:
        jsonschema.validate(doc, schema)
        assert unknown_keys(doc, schema) == [], f"{doc['metadata']['name']}: keys not in the {kind} schema"


def test_unknown_key_check_catches_a_typo():
    schema = crd_schema("RayJob")
    (doc,) = [d for d in documents() if d["kind"] == "RayJob"]
    doc["spec"]["shutdownAfterJobFinish"] = True
    assert unknown_keys(doc, schema) == [".spec.shutdownAfterJobFinish"]


def test_entrypoints_read_the_mounted_job_file_and_parse():
    import argparse

    (config_map,) = [d for d in documents() if d["kind"] == "ConfigMap"]
    job = yaml.safe_load(config_map["data"]["job.yaml"])
    config = config_from_dict(job)  # refuses unknown keys and bad values, naming them
    assert config.routing.calibration == "input" and config.resources.gpus_per_actor == 1
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for spec in ray_jobs():
        words = shlex.split(spec["entrypoint"].replace("$(date -u +%F)", "2026-11-28"))
        assert words[:2] == ["logo-batch", "run"]
        args = parser.parse_args(words[2:])
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in head["volumes"]}
        (name,) = [n for n, path in mounts.items() if Path(args.config).parent == Path(path)]
        assert volumes[name]["configMap"]["name"] == config_map["metadata"]["name"]
        assert Path(args.config).name in config_map["data"]
