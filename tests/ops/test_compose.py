"""compose.yaml, the Dockerfile and the systemd unit, checked statically (no Docker needed)."""

from __future__ import annotations

import configparser
import glob
import posixpath
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SPEACHES_VARIABLES = (
    "SPEACHES_MODEL_IDLE_TIMEOUT",
    "SPEACHES_MAX_MODELS",
    "SPEACHES_MODEL_LOAD_TIMEOUT",
    "SPEACHES_LOG_LEVEL",
    "SPEACHES_BASE_URL",
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def volumes(service: dict) -> list[tuple[str, str]]:
    """(source, target) of a service's mounts, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source", ""), v["target"]
        out.append((source, target))
    return out


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    return [(s, t) for s, t in volumes(service) if s.startswith((".", "/"))]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services(compose: dict) -> None:
    services = compose["services"]
    assert {"earshot", "earshot-gpu", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["alertmanager"]["image"].startswith("prom/alertmanager")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    # CPU earshot runs by default; the GPU one only with `--profile gpu`.
    assert "profiles" not in services["earshot"]
    assert services["earshot-gpu"]["profiles"] == ["gpu"]


def test_earshot_service(compose: dict) -> None:
    earshot = compose["services"]["earshot"]
    build = earshot["build"]
    assert build["context"] == "."
    assert (REPO / build.get("dockerfile", "Dockerfile")).is_file()
    assert "8000:8000" in earshot["ports"]
    env = environment(earshot)
    assert env["EARSHOT_MODELS_DIR"] == "/models"
    assert env["HF_HOME"]
    assert env.get("EARSHOT_DEVICE", "cpu") == "cpu"
    for name in SPEACHES_VARIABLES:
        assert name in env, f"earshot: {name} not set"
    mounts = dict((t, s) for s, t in volumes(earshot))
    # The model cache and the HF cache survive container rebuilds: named volumes.
    assert mounts["/models"] in compose["volumes"]
    assert mounts[env["HF_HOME"]] in compose["volumes"]


def test_earshot_gpu_service(compose: dict) -> None:
    gpu = compose["services"]["earshot-gpu"]
    assert gpu["build"]["args"]["EARSHOT_EXTRAS"] == "gpu"
    assert environment(gpu)["EARSHOT_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    # Same volumes as the CPU one, and Prometheus's "earshot:8000" target reaches it too.
    assert volumes(gpu) == volumes(compose["services"]["earshot"])
    assert "earshot" in gpu["networks"]["default"]["aliases"]


def test_every_bind_mount_source_exists(compose: dict) -> None:
    seen = 0
    for name, service in compose["services"].items():
        for source, _ in bind_mounts(service):
            assert not source.startswith("/"), f"{name}: absolute host path {source}"
            assert (REPO / source).exists(), f"{name}: {source} is not in the repository"
            seen += 1
    assert seen >= 5


def test_named_volumes_are_declared(compose: dict) -> None:
    for name, service in compose["services"].items():
        for source, _ in volumes(service):
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: volume {source} not declared"


def _mounted(service: dict, container_path: str) -> Path | None:
    """The repository path a container path of `service` comes from, if a bind mount covers it."""
    for source, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return REPO / source / posixpath.relpath(container_path, target)
    return None


def test_prometheus_sees_the_rules_in_the_container(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = flag.split("=", 1)[1]
    assert _mounted(prometheus, config_path) == REPO / "prometheus.yml"
    config = yaml.safe_load((REPO / "prometheus.yml").read_text())
    for pattern in config["rule_files"]:
        in_container = posixpath.join(posixpath.dirname(config_path), pattern)
        host = _mounted(prometheus, in_container)
        assert host is not None, f"rule_files {pattern} -> {in_container}: not mounted"
        matched = glob.glob(str(host))
        assert matched, f"rule_files {pattern}: matches nothing in the repository"
        assert all(Path(m).name.endswith(".rules.yml") for m in matched)


def test_alertmanager_and_grafana_mounts(compose: dict) -> None:
    am = compose["services"]["alertmanager"]
    flag = next(a for a in am["command"] if a.startswith("--config.file="))
    assert _mounted(am, flag.split("=", 1)[1]) == REPO / "alertmanager.yml"
    grafana = compose["services"]["grafana"]
    assert _mounted(grafana, "/etc/grafana/provisioning") == REPO / "dashboards" / "provisioning"
    provider = yaml.safe_load((REPO / "dashboards/provisioning/dashboards/earshot.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert _mounted(grafana, path) == REPO / "dashboards"
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        mounted = _mounted(grafana, home)
        assert mounted is not None, home
        assert mounted.is_file(), home


# --- Dockerfile ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_base_and_command(dockerfile: list[tuple[str, str]]) -> None:
    froms = [a for i, a in dockerfile if i == "FROM"]
    assert froms
    assert froms[-1].startswith("python:3.11-slim")
    cmd = [a for i, a in dockerfile if i == "CMD"][-1]
    assert re.sub(r"\s+", "", cmd) == '["earshot","serve","--host","0.0.0.0","--port","8000"]'
    assert any(i == "EXPOSE" and "8000" in a for i, a in dockerfile)


def test_dockerfile_runs_as_non_root(dockerfile: list[tuple[str, str]]) -> None:
    users = [a for i, a in dockerfile if i == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    # The volumes' mount points exist and belong to that user, so named volumes start writable.
    assert any(i == "RUN" and "chown" in a and "/models" in a for i, a in dockerfile)


def test_dockerfile_healthcheck_uses_python(dockerfile: list[tuple[str, str]]) -> None:
    checks = [a for i, a in dockerfile if i == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "python" in checks[0]
    assert "http://127.0.0.1:8000/health" in checks[0]
    assert "curl" not in checks[0]
    assert "wget" not in checks[0]


def test_dockerfile_installs_the_project_with_optional_extras(dockerfile: list[tuple[str, str]]) -> None:
    args = {a.split("=")[0] for i, a in dockerfile if i == "ARG"}
    assert "EARSHOT_EXTRAS" in args
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    for service in ("earshot", "earshot-gpu"):
        assert set(compose["services"][service]["build"].get("args", {})) <= args
    runs = " ".join(a for i, a in dockerfile if i == "RUN")
    assert "pip install" in runs
    assert "EARSHOT_EXTRAS" in runs


def test_dockerignore_keeps_what_the_build_needs() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # an allow-list
    for needed in ("!pyproject.toml", "!README.md", "!src/"):
        assert needed in ignore


# --- systemd ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    # Repeated keys (Environment=) are legal in systemd; keep them all.
    text = (REPO / "deploy" / "earshot.service").read_text()
    counts: dict[str, int] = {}
    renamed = []
    for line in text.splitlines():
        key = line.split("=", 1)[0]
        if "=" in line and not line.startswith("#"):
            counts[key] = counts.get(key, 0) + 1
            line = f"{key}#{counts[key]}={line.split('=', 1)[1]}"
        renamed.append(line)
    parser.read_string("\n".join(renamed))
    return parser


def values(unit: configparser.ConfigParser, section: str, key: str) -> list[str]:
    return [v for k, v in unit[section].items() if k.split("#")[0] == key]


def test_systemd_unit(unit: configparser.ConfigParser) -> None:
    assert values(unit, "Service", "User") == ["earshot"]
    assert values(unit, "Service", "WorkingDirectory") == ["/opt/earshot"]
    assert values(unit, "Service", "ExecStart")[0].startswith("/opt/earshot/.venv/bin/earshot serve")
    assert values(unit, "Service", "Restart") == ["on-failure"]
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]
    env = dict(v.split("=", 1) for v in values(unit, "Service", "Environment"))
    for name in SPEACHES_VARIABLES:
        assert name in env, f"earshot.service: {name} not set"
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert values(unit, "Service", hardening), f"earshot.service: no {hardening}="
