"""Grafana dashboards and provisioning, checked statically: every query parses and uses only
metrics earshot exports (known_metrics.py), with the template variables the dashboards define."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.ops.known_metrics import BY_NAME, WORKER_METRICS
from tests.ops.promql_check import metric_names, problems

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))

# Grafana's built-in variables, as a query would see them.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "60000",
}
# ${name}, ${name:format}, $name, [[name]]
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, variables: set[str]) -> str:
    """`expr` with template variables replaced as Grafana would (dashboard variables as a regex)."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in variables:
            return ".*"
        raise AssertionError(f"undefined variable ${name} in {expr!r}")

    return VARIABLE.sub(value, expr)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target.get('refId')}", target.get("expr", "")


def variable_query(var: dict) -> str:
    query = var.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def test_there_is_a_model_cache_dashboard() -> None:
    assert REPO / "dashboards" / "earshot-model-cache.json" in DASHBOARDS


@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict:
    return load(request.param)


def test_dashboard_identity(dashboard: dict) -> None:
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dashboard):
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    # No two panels share a grid cell (Grafana would push one of them elsewhere).
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_model_cache_dashboard_uid() -> None:
    assert load(REPO / "dashboards" / "earshot-model-cache.json")["uid"] == "earshot-model-cache"


def test_template_variables(dashboard: dict) -> None:
    vars_ = variables(dashboard)
    assert vars_["datasource"]["type"] == "datasource"
    assert vars_["datasource"]["query"] == "prometheus"
    instance, model = vars_["instance"], vars_["model"]
    assert instance["type"] == "query"
    assert (
        re.sub(r"\s", "", variable_query(instance)) == "label_values(earshot_cache_capacity_models,instance)"
    )
    assert model["type"] == "query"
    assert (
        re.sub(r"\s", "", variable_query(model))
        == 'label_values(earshot_model_loads_total{instance=~"$instance"},model)'
    )
    assert model["multi"] is True
    assert model["includeAll"] is True
    # A fleet (DESIGN §10): every node's metrics agent is an instance, each worker a `worker`. With
    # All (".*") the single server, whose series have no worker label, matches too.
    worker = vars_["worker"]
    assert worker["type"] == "query"
    assert (
        re.sub(r"\s", "", variable_query(worker))
        == 'label_values(earshot_cache_capacity_models{instance=~"$instance"},worker)'
    )
    for var in (instance, worker, model):
        assert var["multi"] is True, var["name"]
        assert var["includeAll"] is True, var["name"]
    for var in (instance, worker):
        assert var["allValue"] == ".*", var["name"]
        assert var["current"]["value"] == ["$__all"], var["name"]
    for var in (instance, worker, model):
        assert var["datasource"]["uid"] == "${datasource}"


def test_every_panel_queries_through_the_datasource_variable(dashboard: dict) -> None:
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("targets"), f"{panel['title']}: no queries"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target.get("expr"), f"{panel['title']} {target.get('refId')}: empty expr"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_queries_parse_and_use_only_known_metrics(dashboard: dict) -> None:
    names = set(variables(dashboard))
    checked = 0
    for where, expr in queries(dashboard):
        concrete = substitute(expr, names)
        assert "$" not in concrete, f"{where}: {concrete}"
        assert problems(concrete) == [], f"{where}: {expr}"
        checked += 1
    for var in variables(dashboard).values():
        if var["type"] == "query":
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", variable_query(var))
            assert inner, f"variable {var['name']}: expected label_values(<selector>, <label>)"
            assert problems(substitute(inner.group(1), names)) == [], var["name"]
    assert checked >= 10


def test_queries_filter_by_instance_and_use_rate_interval(dashboard: dict) -> None:
    for where, expr in queries(dashboard):
        # Every selector is scoped to the chosen instance(s) ...
        assert expr.count("$instance") >= len(re.findall(r"\b(?:earshot_\w+|up)\s*\{", expr)), (
            f"{where}: {expr}"
        )
        assert not re.search(r"\b(?:earshot_\w+|up)\b(?!\s*\{)(?!_)", expr), (
            f"{where}: selector without labels: {expr}"
        )
        # ... and range vectors follow the dashboard's resolution, not a fixed window.
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in {"$__rate_interval", "$__range"}, f"{where}: fixed window [{window}]"


def test_worker_metrics_are_filtered_by_worker(dashboard: dict) -> None:
    # Every selector of a metric a fleet worker exports follows the worker variable; the others
    # (the gateway's HTTP metrics, up, ...) have no worker label and must not filter on one.
    selector = re.compile(r"\b(earshot_\w+|up)\s*\{([^}]*)\}")
    seen = 0
    for where, expr in queries(dashboard):
        for name, matchers in selector.findall(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base in WORKER_METRICS or name in WORKER_METRICS:
                assert 'worker=~"$worker"' in matchers, f"{where}: {name} without the worker filter: {expr}"
                seen += 1
            else:
                assert "worker" not in matchers, f"{where}: {name} has no worker label: {expr}"
    assert seen >= 20


FLEET_PANELS = {
    "Models per worker": {"earshot_model_loaded"},
    "Loads and evictions per worker (per minute)": {
        "earshot_model_loads_total",
        "earshot_model_evictions_total",
    },
    "Requests per worker (per minute)": {"earshot_cache_requests_total"},
}


def test_fleet_panels_group_by_worker() -> None:
    dashboard = load(REPO / "dashboards" / "earshot-model-cache.json")
    panels = {p["title"]: p for p in all_panels(dashboard)}
    names = set(variables(dashboard))
    for title, metrics in FLEET_PANELS.items():
        panel = panels[title]
        used = set()
        for target in panel["targets"]:
            expr = target["expr"]
            assert re.match(r"\s*(sum|max) by \(worker\)", expr), f"{title}: {expr}"
            assert "{{worker}}" in target["legendFormat"], title
            used |= metric_names(substitute(expr, names))
        assert metrics <= used, f"{title}: {sorted(used)}"


def test_model_cache_dashboard_covers_the_cache() -> None:
    dashboard = load(REPO / "dashboards" / "earshot-model-cache.json")
    used = set()
    for _, expr in queries(dashboard):
        used |= metric_names(substitute(expr, set(variables(dashboard))))
    # Every earshot metric is on the dashboard somewhere (histograms through their series).
    for name, metric in BY_NAME.items():
        if metric.source in {"earshot", "http"}:
            series = {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            assert used & series, f"{name} is on no panel"
    panels = {p["title"]: p for p in all_panels(dashboard)}
    table = panels["Loaded models"]
    assert table["type"] == "table"
    table_metrics = set().union(
        *(metric_names(substitute(t["expr"], {"instance", "worker", "model"})) for t in table["targets"])
    )
    assert {
        "earshot_model_loaded",
        "earshot_model_idle_seconds",
        "earshot_model_expires_in_seconds",
        "earshot_model_memory_bytes",
        "earshot_model_in_use",
    } <= table_metrics
    assert all(t.get("instant") and t.get("format") == "table" for t in table["targets"])
    assert any(
        t["id"] == "joinByField" and t["options"]["byField"] == "model" for t in table["transformations"]
    )
    heatmaps = [p for p in panels.values() if p["type"] == "heatmap"]
    assert any(
        "earshot_model_load_duration_seconds_bucket" in t["expr"] and t.get("format") == "heatmap"
        for p in heatmaps
        for t in p["targets"]
    )


# --- Provisioning ----------------------------------------------------------------------------


def test_datasource_provisioning() -> None:
    config = yaml.safe_load((REPO / "dashboards/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = config["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    # The dashboards' datasource variable defaults to this uid.
    for path in DASHBOARDS:
        current = variables(load(path))["datasource"].get("current", {})
        assert current.get("value") == ds["uid"], path.name


def test_dashboard_provider_points_at_the_dashboards() -> None:
    config = yaml.safe_load((REPO / "dashboards/provisioning/dashboards/earshot.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mounts = [v.split(":") for v in compose["services"]["grafana"]["volumes"] if v.startswith(".")]
    sources = {target: source for source, target, *_ in mounts}
    assert sources[provider["options"]["path"]] == "./dashboards"
    assert sources["/etc/grafana/provisioning"] == "./dashboards/provisioning"
