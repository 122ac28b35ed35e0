"""Prometheus and Alertmanager configuration: promtool / amtool checks, and the alert rules' unit tests.

Needs promtool and amtool (scripts/install-system-deps.sh installs them; `make test` runs it).
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.ops.promql_check import problems

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "alerts"
RULE_FILES = sorted(ALERTS.glob("*.yml"))
TEST_FILES = sorted((ALERTS / "tests").glob("*.yml"))

# DESIGN.md §7 and the ops brief: the alerts operators rely on.
REQUIRED_ALERTS = {
    "EarshotEvictionStorm",
    "EarshotModelLoadStuck",
    "EarshotModelLoadFailures",
    "EarshotModelLoadSlow",
    "EarshotLowCacheHitRatio",
    "EarshotGPUMemoryHigh",
    "EarshotInstanceDown",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: run scripts/install-system-deps.sh (or `make system-deps`)")
    return path


def run(*argv: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(proc.args)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def load_rules() -> list[dict]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules += [r for r in group["rules"] if "alert" in r]
    return rules


def test_files_exist() -> None:
    assert RULE_FILES, "no alerts/*.yml rule files"
    assert TEST_FILES, "no alerts/tests/*.yml promtool tests"


def test_promtool_check_config() -> None:
    # rule_files in prometheus.yml is relative to the config file's directory, so the file compose
    # mounts at /etc/prometheus/prometheus.yml (next to /etc/prometheus/alerts) also checks here,
    # with the real rules: no --syntax-only, no rewritten copy.
    proc = run(tool("promtool"), "check", "config", REPO / "prometheus.yml", cwd=REPO.parent)
    assert proc.returncode == 0, output(proc)
    text = proc.stdout + proc.stderr
    for path in RULE_FILES:
        assert f"Checking {path}" in text, (
            f"prometheus.yml's rule_files did not pick up {path}\n{output(proc)}"
        )


def test_promtool_check_fleet_config() -> None:
    # The fleet's config (scrapes Ray's metrics agents through Ray's service-discovery file) loads
    # the same rules, relative to deploy/; the file_sd file need not exist for the check.
    config = REPO / "deploy" / "prometheus-fleet.yml"
    proc = run(tool("promtool"), "check", "config", config, cwd=REPO.parent)
    assert proc.returncode == 0, output(proc)
    text = proc.stdout + proc.stderr
    for path in RULE_FILES:
        assert f"Checking {path}" in text, (
            f"prometheus-fleet.yml's rule_files did not pick up {path}\n{output(proc)}"
        )
    scrape = yaml.safe_load(config.read_text())["scrape_configs"]
    fleet = next(job for job in scrape if job["job_name"].startswith("earshot"))
    (sd,) = fleet["file_sd_configs"]
    assert [Path(f).name for f in sd["files"]] == ["prom_metrics_service_discovery.json"]


def test_promtool_check_rules() -> None:
    proc = run(tool("promtool"), "check", "rules", *RULE_FILES)
    assert proc.returncode == 0, output(proc)
    assert f"SUCCESS: {len(load_rules())} rules found" in proc.stdout, output(proc)


def test_promtool_test_rules() -> None:
    proc = run(tool("promtool"), "test", "rules", *TEST_FILES)
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.count("SUCCESS") == len(TEST_FILES), output(proc)


def test_amtool_check_config() -> None:
    proc = run(tool("amtool"), "check-config", REPO / "alertmanager.yml")
    assert proc.returncode == 0, output(proc)
    assert "SUCCESS" in proc.stdout, output(proc)


def test_alertmanager_routes_to_a_webhook_with_resolved() -> None:
    config = yaml.safe_load((REPO / "alertmanager.yml").read_text())
    assert config["route"]["group_by"] == ["alertname"]
    receivers = {r["name"]: r for r in config["receivers"]}
    hooks = receivers[config["route"]["receiver"]]["webhook_configs"]
    assert hooks
    assert all(h["send_resolved"] is True and h["url"].startswith("http") for h in hooks)


def test_prometheus_scrapes_earshot_and_alerts_to_alertmanager() -> None:
    config = yaml.safe_load((REPO / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    earshot = jobs["earshot"]
    assert earshot.get("metrics_path", "/metrics") == "/metrics"
    assert config["global"]["scrape_interval"] == "15s"
    assert [t for sc in earshot["static_configs"] for t in sc["targets"]] == ["earshot:8000"]
    targets = [
        t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]
    ]
    assert targets == ["alertmanager:9093"]


def test_rules_are_complete() -> None:
    rules = load_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    assert set(names) >= REQUIRED_ALERTS, f"missing: {REQUIRED_ALERTS - set(names)}"
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no `for:`"
        assert rule.get("labels", {}).get("severity") in {"page", "ticket"}, f"{name}: severity page|ticket"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert "Runbook:" in annotations.get("description", ""), f"{name}: description without a runbook"


@pytest.mark.parametrize("rule", load_rules(), ids=lambda r: r["alert"])
def test_rule_expressions_use_known_metrics(rule: dict) -> None:
    assert problems(rule["expr"]) == []


def _test_cases() -> list[tuple[Path, str, list]]:
    """(test file, alertname, exp_alerts) for every alert_rule_test in alerts/tests/."""
    cases = []
    for path in TEST_FILES:
        for group in yaml.safe_load(path.read_text())["tests"]:
            cases += [
                (path, t["alertname"], t.get("exp_alerts") or []) for t in group.get("alert_rule_test", [])
            ]
    return cases


def test_unit_tests_load_the_real_rules() -> None:
    # A test that loads a copy of the rules would pass whatever alerts/*.rules.yml says.
    for path in TEST_FILES:
        loaded = {(path.parent / f).resolve() for f in yaml.safe_load(path.read_text())["rule_files"]}
        assert loaded, f"{path}: no rule_files"
        assert loaded <= {p.resolve() for p in RULE_FILES}, f"{path}: rule_files {loaded}"


def test_every_rule_is_tested_firing_and_not_firing() -> None:
    cases = _test_cases()
    for rule in load_rules():
        name = rule["alert"]
        mine = [exp for _, alertname, exp in cases if alertname == name]
        assert any(mine), f"{name}: no test where it fires"
        assert any(not exp for exp in mine), f"{name}: no test where it stays silent"
        assert len(mine) >= 3, f"{name}: test it at more eval_times ({len(mine)})"
        for exp in mine:
            for alert in exp:
                assert alert["exp_labels"].get("severity") == rule["labels"]["severity"]
                assert set(alert.get("exp_annotations", {})) >= {"summary", "description"}


# --- The unit tests are not vacuous: break each rule and they must fail. ---------------------------

MUTATIONS = {
    "never fires": lambda rule: {**rule, "expr": "vector(1) == 0"},
    "always fires": lambda rule: {**rule, "expr": "vector(1)"},
    "no for": lambda rule: {**rule, "for": "0s"},
}


def _mutated_run(tmp: Path, name: str, mutation: str) -> subprocess.CompletedProcess[str]:
    """Run the promtool tests of alert `name` against rules where that alert is mutated."""
    workdir = tmp / mutation.replace(" ", "-")
    (workdir / "tests").mkdir(parents=True)
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group["rules"] = [MUTATIONS[mutation](r) if r.get("alert") == name else r for r in group["rules"]]
        (workdir / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = [p for p, alertname, _ in _test_cases() if alertname == name]
    for path in set(tests):
        shutil.copy(path, workdir / "tests" / path.name)
    return run(tool("promtool"), "test", "rules", *sorted((workdir / "tests").iterdir()))


@pytest.mark.parametrize("name", sorted(r["alert"] for r in load_rules()))
def test_unit_tests_fail_when_the_rule_is_broken(name: str, tmp_path: Path) -> None:
    # Each alert's tests must notice it never firing (positive cases), firing at all times
    # (negative cases) and firing without waiting for `for:` (pending cases).
    with ThreadPoolExecutor(len(MUTATIONS)) as pool:
        runs = dict(
            zip(MUTATIONS, pool.map(lambda m: _mutated_run(tmp_path, name, m), MUTATIONS), strict=True)
        )
    for mutation, proc in runs.items():
        assert proc.returncode != 0, f"{name} {mutation}: the unit tests still pass\n{output(proc)}"
        assert f"alertname: {name}," in proc.stdout + proc.stderr, f"{name} {mutation}:\n{output(proc)}"
