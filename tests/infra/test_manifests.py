"""KubeRay manifests: valid against the KubeRay CRD schemas, no misspelt key, job files that the
pipeline's own configuration loader accepts, at the paths the entrypoints read, and every
`logo-batch` command line in infra/ accepted by the real parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.cli import build_parser
from jobs.nightly import fill_date
from pipeline.config_io import config_from_dict

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((ROOT / "infra").glob("*.yaml"))
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}


def documents() -> list[dict]:
    """Every document of infra/*.yaml, and the manifests kept inside ConfigMaps (`*.yaml` values
    with a `kind`), which `kubectl create -f` applies later."""
    docs = [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
    embedded = [inner for doc in docs if doc["kind"] == "ConfigMap" for name, text in doc["data"].items()
                if name.endswith(".yaml") for inner in yaml.safe_load_all(text) if inner and "kind" in inner]
    return docs + embedded


def job_files() -> dict[str, dict]:
    """ConfigMap data that are job files (not manifests), by file name."""
    return {name: yaml.safe_load(text) for doc in documents() if doc["kind"] == "ConfigMap"
            for name, text in doc["data"].items() if "kind" not in (yaml.safe_load(text) or {})}


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


def test_there_are_manifests_for_a_job_a_cluster_and_a_nightly_run():
    kinds = [d["kind"] for d in documents()]
    assert {"RayJob", "RayCronJob", "RayCluster", "CronJob", "ConfigMap"} <= set(kinds)
    assert kinds.count("RayJob") == 2  # rayjob.yaml's, and the one cronjob.yaml creates


def test_cluster_has_an_autoscaled_gpu_worker_group():
    (cluster,) = [d for d in documents() if d["kind"] == "RayCluster"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] < group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_cron_fallback_creates_the_nightly_rayjob():
    docs = documents()
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    (raycron,) = [d for d in docs if d["kind"] == "RayCronJob"]
    (created,) = [d for d in docs if d["kind"] == "RayJob" and "generateName" in d["metadata"]]
    assert created["spec"] == raycron["spec"]["jobTemplate"] and cron["spec"]["schedule"] == raycron["spec"]["schedule"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"]}
    command = container["command"]
    assert command[:3] == ["kubectl", "create", "-f"]
    path = Path(command[3])
    (name,) = [n for n, mount in mounts.items() if path.parent == Path(mount)]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volumes[name]]
    assert yaml.safe_load(config_map["data"][path.name]) == created
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    assert pod["serviceAccountName"] == next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob", "RayCluster"])
def test_valid_against_the_kuberay_crd_with_no_unknown_key(kind):
    schema = crd_schema(kind)
    docs = [d for d in documents() if d["kind"] == kind]
    assert docs
    for doc in docs:
        jsonschema.validate(doc, schema)
        assert unknown_keys(doc, schema) == [], f"{doc['metadata']['name']}: keys not in the {kind} schema"


def test_unknown_key_check_catches_a_typo():
    schema = crd_schema("RayJob")
    doc = [d for d in documents() if d["kind"] == "RayJob"][0]
    doc["spec"]["shutdownAfterJobFinish"] = True
    assert unknown_keys(doc, schema) == [".spec.shutdownAfterJobFinish"]


def test_job_files_load_with_the_pipeline_loader():
    files = job_files()
    assert set(files) == {"job.yaml", "nightly.yaml"}
    config = config_from_dict(files["job.yaml"])  # refuses unknown keys and bad values, naming them
    assert config.routing.calibration == "input" and config.resources.gpus_per_actor == 1
    night = config_from_dict(fill_date(files["nightly.yaml"], "2026-11-28"))
    assert night.input.uri.endswith("/2026-11-28/") and night.output.uri.endswith("/2026-11-28")


def test_entrypoints_read_a_mounted_job_file_and_parse():
    parser = build_parser(load_all=True)
    config_maps = {d["metadata"]["name"]: d for d in documents() if d["kind"] == "ConfigMap"}
    for spec in ray_jobs():
        words = shlex.split(spec["entrypoint"])
        assert words[0] == "logo-batch" and words[1] in ("run", "nightly")
        args = parser.parse_args(words[1:])
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in head["volumes"]}
        (name,) = [n for n, path in mounts.items() if Path(args.config).parent == Path(path)]
        assert Path(args.config).name in config_maps[volumes[name]["configMap"]["name"]]["data"]


COMMAND_LINE = re.compile(r"^\s*(?:#\s*)?(?:entrypoint:\s*|&&\s*|RUN\s+)?(logo-batch\s[^#>]*)")


def command_lines() -> list[tuple[str, str]]:
    """Every line of infra/ (manifests, their comments, README, Dockerfile) that is a `logo-batch`
    command, without a trailing comment or redirection."""
    return [(path.name, match.group(1).strip()) for path in sorted((ROOT / "infra").iterdir())
            for line in path.read_text().splitlines() if (match := COMMAND_LINE.match(line))]


def test_every_logo_batch_command_line_parses_with_the_real_parser():
    lines = command_lines()
    commands = {shlex.split(text)[1] for _, text in lines}
    assert {"run", "submit", "nightly"} <= commands, commands
    parser = build_parser(load_all=True)
    for where, text in lines:
        try:
            parser.parse_args(shlex.split(text)[1:])
        except SystemExit as exit_:
            assert exit_.code == 0, f"{where}: {text!r} does not parse"  # 0: a --help line
