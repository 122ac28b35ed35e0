"""EarshotEvictionStorm end to end: a real eviction storm on earshot, scraped by a real Prometheus
evaluating the real alerts/earshot.rules.yml, notified by a real Alertmanager to a webhook.

max_models=1 and two Whisper models alternating: every request evicts the other model (reason
`capacity`) and reloads its own (a reload: evicted less than thrash_window_seconds ago). The rule
wants more than 3 of each per minute over `rate[2m]`, for 1 minute; the storm makes tens per
minute, so the condition holds after a few loads, the alert fires about a minute later and, once
the storm stops, resolves when the 2-minute window has drained (about 2 minutes). The test waits
for each notification (no fixed sleeps) and bounds the waits by what the rule allows.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import promql_parser
import pytest
import yaml

from tests.e2e.conftest import BASE, TINY
from tests.support.stack import (
    REPO,
    Stack,
    StackError,
    derive_alertmanager_config,
    derive_prometheus_config,
    find_executable,
    wait_until,
)

pytestmark = pytest.mark.e2e

ALERT = "EarshotEvictionStorm"
# From the storm's start: a few loads until the 2m rates pass 3/min, then `for: 1m`.
FIRING_TIMEOUT = 240
# From the storm's end: the 2m window drains, then one evaluation and one group_interval.
RESOLVED_TIMEOUT = 300
FOR_SECONDS = 60


class Storm:
    """Transcription requests alternating between two models, one at a time, in a thread."""

    def __init__(self, url: str, audio: bytes, models: tuple[str, str] = (TINY, BASE)) -> None:
        self._url = url
        self._audio = audio
        self._models = models
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eviction-storm", daemon=True)
        self.statuses: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.stopped_at = 0.0

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self._url, timeout=120) as client:
                i = 0
                while not self._stop.is_set():
                    model = self._models[i % 2]
                    response = client.post(
                        "/v1/audio/transcriptions",
                        files={"file": ("clip.wav", self._audio, "audio/wav")},
                        data={"model": model},
                    )
                    self.statuses.append((model, response.status_code))
                    i += 1
        except BaseException as e:
            self.error = e

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(150)
        self.stopped_at = time.monotonic()
        assert not self._thread.is_alive(), "the storm thread did not stop"

    def per_minute(self) -> float:
        return len(self.statuses) / max(1e-9, self.stopped_at - self.started_at) * 60


def is_storm(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda alert: alert["labels"].get("alertname") == ALERT and alert["status"] == status


def rule_expression() -> str:
    for group in yaml.safe_load((REPO / "alerts" / "earshot.rules.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == ALERT:
                return str(rule["expr"])
    raise AssertionError(f"{ALERT} is not in alerts/earshot.rules.yml")


def diagnostics(stack: Stack, storm: Storm) -> str:
    """What Prometheus, Alertmanager and the receiver saw, for a failure message."""
    sel = f'instance="{stack.earshot_instance}"'
    lines = [f"storm: {len(storm.statuses)} requests, error {storm.error!r}"]
    for expr in (
        f"sum(rate(earshot_model_reloads_total{{{sel}}}[2m])) * 60",
        f'sum(rate(earshot_model_evictions_total{{{sel}, reason=~"capacity|memory"}}[2m])) * 60',
        f"up{{{sel}}}",
    ):
        lines.append(f"{expr} = {stack.query(expr)}")
    lines.append(f"prometheus alerts: {json.dumps(stack.alerts())}")
    with httpx.Client(timeout=10) as client:
        lines.append(f"alertmanager alerts: {client.get(stack.alertmanager_url + '/api/v2/alerts').text}")
    assert stack.receiver is not None
    lines += [f"notification: {json.dumps(n.payload)}" for n in stack.receiver.notifications()]
    return "\n".join(lines)


def test_the_stack_runs_the_repository_configs(stack: Stack) -> None:
    """The Prometheus under test loads the repository's rule file and alerts through the
    Alertmanager whose webhook is the test receiver; both derived configs pass promtool/amtool."""
    for argv in (
        [find_executable("promtool"), "check", "config", str(stack.prometheus_config_path)],
        [find_executable("amtool"), "check-config", str(stack.alertmanager_config_path)],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"{argv}\n{proc.stdout}\n{proc.stderr}"
    config = yaml.safe_load(stack.prometheus_config_path.read_text())
    assert config["rule_files"] == [str(REPO / "alerts" / "*.rules.yml")]
    assert config["global"]["scrape_interval"] == "1s"
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert targets["earshot"] == [stack.earshot_instance]
    groups = httpx.get(stack.prometheus_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    storm_rules = [r for g in groups for r in g["rules"] if r["name"] == ALERT]
    assert len(storm_rules) == 1
    # The same expression as the file's (Prometheus prints it in its own layout).
    assert str(promql_parser.parse(storm_rules[0]["query"])) == str(promql_parser.parse(rule_expression()))
    assert storm_rules[0]["duration"] == FOR_SECONDS
    assert groups[0]["file"] == str(REPO / "alerts" / "earshot.rules.yml")
    am = yaml.safe_load(stack.alertmanager_config_path.read_text())
    assert stack.receiver is not None
    assert am["receivers"][0]["webhook_configs"][0]["url"] == stack.receiver.url


@pytest.mark.timeout(FIRING_TIMEOUT + RESOLVED_TIMEOUT + 180)
def test_eviction_storm_fires_and_resolves(stack: Stack, clip_wav: bytes) -> None:
    receiver = stack.receiver
    assert receiver is not None
    sel = f'instance="{stack.earshot_instance}"'
    capacity = f'sum(earshot_model_evictions_total{{{sel}, reason="capacity"}})'

    # Before: the alert is neither pending nor firing, and nothing has been notified about it.
    assert [a for a in stack.alerts() if a["labels"]["alertname"] == ALERT] == []
    since = len(receiver.notifications())
    assert not any(is_storm("firing")(a) for n in receiver.notifications() for a in n.alerts)
    evictions_before = stack.query_value(capacity) or 0.0

    storm = Storm(stack.earshot_url, clip_wav)
    storm.start()
    try:
        # The scrape works: Prometheus sees the storm's capacity evictions.
        evictions = wait_until(
            lambda: (v := stack.query_value(capacity)) is not None and v > evictions_before and v,
            60,
            lambda: f"no new capacity evictions in Prometheus\n{diagnostics(stack, storm)}",
        )
        assert evictions > 0
        fired = receiver.wait_for_alert(is_storm("firing"), FIRING_TIMEOUT, since=since)
        assert storm.error is None, storm.error
        assert fired is not None, f"{ALERT} not notified firing\n{diagnostics(stack, storm)}"
    finally:
        storm.stop()
    assert storm.error is None, storm.error
    assert {status for _, status in storm.statuses} == {200}, storm.statuses

    notification, alert = fired
    time_to_firing = notification.received_at - storm.started_at
    # `for: 1m`: pending for a minute before firing, never at once (less one evaluation interval:
    # the condition may have turned true at the evaluation just before the storm's first request).
    assert time_to_firing >= FOR_SECONDS - 1, time_to_firing
    assert alert["labels"]["instance"] == stack.earshot_instance
    assert alert["labels"]["job"] == "earshot"
    assert alert["labels"]["severity"] == "ticket"
    assert "thrashing" in alert["annotations"]["summary"]
    assert "Runbook:" in alert["annotations"]["description"]
    assert notification.payload["receiver"] == "webhook"  # routed by alertmanager.yml
    assert notification.payload["groupLabels"] == {"alertname": ALERT}

    resolved = receiver.wait_for_alert(is_storm("resolved"), RESOLVED_TIMEOUT, since=since)
    assert resolved is not None, f"{ALERT} not notified resolved\n{diagnostics(stack, storm)}"
    resolved_notification, resolved_alert = resolved
    assert resolved_alert["labels"]["instance"] == stack.earshot_instance
    assert resolved_alert["fingerprint"] == alert["fingerprint"]
    time_to_resolved = resolved_notification.received_at - storm.stopped_at
    assert time_to_resolved > 0
    print(
        f"\n{ALERT}: storm of {len(storm.statuses)} requests ({storm.per_minute():.0f}/min); firing notified "
        f"{time_to_firing:.0f} s after the storm started, storm stopped after "
        f"{storm.stopped_at - storm.started_at:.0f} s, resolved notified {time_to_resolved:.0f} s "
        f"after it stopped"
    )
    # Prometheus agrees: the alert is no longer pending or firing.
    assert [a for a in stack.alerts() if a["labels"]["alertname"] == ALERT] == []


def test_derived_configs_keep_the_files_and_change_only_addresses_and_timing() -> None:
    """What the stack derives from alertmanager.yml / prometheus.yml (no processes involved)."""
    source = yaml.safe_load((REPO / "alertmanager.yml").read_text())
    derived = derive_alertmanager_config(
        source, webhook_url="http://127.0.0.1:1/", timing={"group_wait": "1s", "group_interval": "1s"}
    )
    # Sub-routes that set their own timing get the shortened one too; everything else is the file's.
    for route in (derived["route"], *derived["route"].get("routes", [])):
        assert route.get("group_wait", "1s") == "1s"
    assert derived["route"]["group_interval"] == "1s"
    assert derived["route"]["repeat_interval"] == source["route"]["repeat_interval"]
    assert derived["inhibit_rules"] == source["inhibit_rules"]
    hooks = [h for r in derived["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks
    assert all(h["url"] == "http://127.0.0.1:1/" and h["send_resolved"] for h in hooks)

    prometheus = yaml.safe_load((REPO / "prometheus.yml").read_text())
    addresses = {
        "earshot:8000": "127.0.0.1:1",
        "alertmanager:9093": "127.0.0.1:2",
        "localhost:9090": "127.0.0.1:3",
    }
    derived = derive_prometheus_config(prometheus, source_dir=REPO, addresses=addresses, scrape_interval="1s")
    assert derived["global"]["scrape_timeout"] == "1s"  # capped: Prometheus refuses timeout > interval
    assert derived["global"]["evaluation_interval"] == prometheus["global"]["evaluation_interval"]
    with pytest.raises(StackError, match="earshot:8000"):
        derive_prometheus_config(prometheus, source_dir=REPO, addresses={}, scrape_interval="1s")
