"""deploy/kubernetes/, checked offline.

Core kinds (Service, ConfigMap, PersistentVolumeClaim, ...) are validated against the Kubernetes
OpenAPI schemas that kubernetes-validate ships (strict: an unknown field is an error). The custom
resources (KubeRay's RayService, the Prometheus Operator's PodMonitor) have no schema there: their
schemas live in the CRDs of operators this repository does not vendor, and kubernetes-validate
refuses them, so they are checked for what a cluster would need first (apiVersion, kind,
metadata.name) and for what earshot relies on: the Ray version of the fleet extra, the ports the
Service and the scrape configs name, and relabeling identical to deploy/prometheus-fleet.yml's.
The Prometheus configuration in the ConfigMap goes through `promtool check config`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# Custom resources: not in Kubernetes' own schemas.
CRD_GROUPS = {"ray.io", "monitoring.coreos.com"}


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.name}#{i}", doc


DOCS = list(documents())


def group(doc: dict[str, Any]) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc.get("kind") == kind]


def test_manifests_exist() -> None:
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"RayService", "Service", "PodMonitor", "ConfigMap"} <= kinds, kinds


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_every_manifest_has_identity(where: str, doc: dict[str, Any]) -> None:
    assert isinstance(doc.get("apiVersion"), str), where
    assert doc["apiVersion"], where
    assert isinstance(doc.get("kind"), str), where
    assert doc["kind"], where
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), where
    assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "earshot", where


CORE = [(w, d) for w, d in DOCS if group(d) not in CRD_GROUPS]


@pytest.mark.parametrize(("where", "doc"), CORE, ids=[w for w, _ in CORE])
def test_core_kinds_validate_against_the_kubernetes_schema(where: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {e.message} at {'.'.join(str(p) for p in e.path)}")


def test_crds_are_the_custom_ones() -> None:
    # Every document kubernetes-validate cannot check is one of the two operators' kinds.
    crds = {(group(d), d["kind"]) for _, d in DOCS if group(d) in CRD_GROUPS}
    assert crds == {("ray.io", "RayService"), ("monitoring.coreos.com", "PodMonitor")}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(by_kind("RayService")[0], latest_version(), strict=True)


def pods(service: dict[str, Any]) -> Iterator[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    yield cluster["headGroupSpec"]["template"]
    for group_spec in cluster["workerGroupSpecs"]:
        yield group_spec["template"]


def test_rayservice_runs_the_fleet() -> None:
    (service,) = by_kind("RayService")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    pins = [re.fullmatch(r"ray\[serve\]==([\d.]+)", d) for d in extras.get("fleet", [])]
    pinned = next((m.group(1) for m in pins if m), None)
    if pinned is not None:  # the fleet extra (earshot[fleet]) pins Ray Serve: the cluster runs that
        assert service["spec"]["rayClusterConfig"]["rayVersion"] == pinned
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["route_prefix"] == "/"
    module, _, attr = app["import_path"].partition(":")
    assert module.startswith("earshot.fleet."), app["import_path"]
    assert attr.isidentifier(), app["import_path"]
    assert app["runtime_env"]["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert all(k.startswith(("EARSHOT_", "RAY_")) for k in app["runtime_env"]["env_vars"])
    # Every Ray node exports its metrics agent on the port the scrape configs name `metrics`.
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for spec, pod in zip(groups, pods(service), strict=True):
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(spec["rayStartParams"]["metrics-export-port"])
        assert ports["serve"] == serve_config["http_options"]["port"]
        assert {e["name"]: e["value"] for e in container["env"]}["RAY_USAGE_STATS_ENABLED"] == "0"
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "earshot"


def test_service_selects_the_serve_pods() -> None:
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "earshot"]
    (ray_service,) = by_kind("RayService")
    selector = service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    matched = 0
    for pod in pods(ray_service):
        labels = pod["metadata"]["labels"]
        own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}  # KubeRay's are set live
        if own.items() <= labels.items():
            (container,) = pod["spec"]["containers"]
            assert port["targetPort"] in {p["name"] for p in container["ports"]}
            matched += 1
    assert matched == len(list(pods(ray_service)))


def fleet_metric_relabels() -> list[dict[str, Any]]:
    config = yaml.safe_load((REPO / "deploy" / "prometheus-fleet.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "earshot-fleet"]
    return list(job["metric_relabel_configs"])


def camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p.capitalize() for p in rest)


def test_podmonitor_relabels_as_the_fleet_config() -> None:
    (monitor,) = by_kind("PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "earshot"}
    expected = [{camel(k): v for k, v in rule.items()} for rule in fleet_metric_relabels()]
    assert endpoint["metricRelabelings"] == expected


def test_prometheus_configmap_checks_and_relabels_as_the_fleet_config(tmp_path: Path) -> None:
    (configmap,) = [c for c in by_kind("ConfigMap") if "prometheus.yml" in c.get("data", {})]
    text = configmap["data"]["prometheus.yml"]
    config = yaml.safe_load(text)
    (job,) = config["scrape_configs"]
    assert job["metric_relabel_configs"] == fleet_metric_relabels()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found on PATH: run scripts/install-system-deps.sh")
    # Debian's Prometheus is built without Kubernetes service discovery (promtool: "field
    # kubernetes_sd_configs not found"): the check runs on the same configuration with the pod
    # discovery swapped for one static target; everything else (relabeling, rules) as shipped.
    sd = job.pop("kubernetes_sd_configs")
    assert sd == [{"role": "pod", "namespaces": {"own_namespace": True}}]
    job["static_configs"] = [{"targets": ["10.0.0.5:8080"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
