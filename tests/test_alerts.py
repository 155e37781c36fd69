"""``deploy/prometheus-alerts.yml``: well-formed, and every metric it reads is one we export.

The parse checks always run. ``promtool check rules`` and the rule unit tests
(``tests/prometheus/alerts_test.yml``) run when promtool is on PATH (Debian: ``apt-get
install prometheus``); only those two are skipped without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from outbox_worker import metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus-alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"

# Series Prometheus makes itself, not any exporter.
BUILTIN_SERIES = {"up": ("job", "instance")}
# Labels every scraped series carries.
TARGET_LABELS = {"job", "instance"}
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document, dict)
    assert set(document) == {"groups"}
    rules: list[dict[str, Any]] = []
    for group in document["groups"]:
        assert group["name"]
        assert group["rules"], f"group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


ALERT_RULES = [rule for rule in load_rules() if "alert" in rule]


def exported_series() -> dict[str, tuple[str, ...]]:
    """Every sample name this package exposes, with the labels it carries."""
    labels_of = {
        next(iter(metric.describe())).name: tuple(metric._labelnames)  # declared labels
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
    }
    series: dict[str, tuple[str, ...]] = {}
    # The default registry is what start_http_server and the app's /metrics expose.
    for family in REGISTRY.collect():
        if family.name not in labels_of:
            continue
        for suffix in SAMPLE_SUFFIXES[family.type]:
            extra = ("le",) if suffix == "_bucket" else ()
            series[family.name + suffix] = labels_of[family.name] + extra
    return series


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    names: set[str] = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # 1e3, 5m
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        if name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """``name{label="value", …}`` selectors of an expression, with their equality matchers."""
    found: list[tuple[str, dict[str, str]]] = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr):
        matchers = dict(
            re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=|!=|=~|!~)\s*"([^"]*)"', match.group(2))
        )
        found.append((match.group(1), matchers))
    return found


def test_metric_name_extraction() -> None:
    expr = (
        'max by (queue) (outbox_queue_depth{state="due"}) > 1e3 and '
        "sum without (instance) (rate(outbox_jobs_dead_total[15m] offset 5m)) / up"
    )
    assert metric_names(expr) == {"outbox_queue_depth", "outbox_jobs_dead_total", "up"}
    assert selectors(expr) == [("outbox_queue_depth", {"state": "due"})]


def test_there_are_alerts_for_each_failure_mode() -> None:
    names = [rule["alert"] for rule in ALERT_RULES]
    assert len(names) == len(set(names)), "alert names must be unique"
    used = set().union(*(metric_names(rule["expr"]) for rule in ALERT_RULES))
    # A growing queue, an old due job, a dead-job rate, no worker heartbeats, a queue the
    # circuit breaker paused.
    assert {
        "outbox_queue_paused",
        "outbox_queue_depth",
        "outbox_queue_oldest_due_seconds",
        "outbox_jobs_dead_total",
        "outbox_workers_alive",
        "up",
    } <= used
    exprs = " ".join(rule["expr"] for rule in ALERT_RULES)
    assert "deriv(outbox_queue_depth" in exprs
    assert "rate(outbox_jobs_dead_total" in exprs


@pytest.mark.parametrize("rule", ALERT_RULES, ids=[rule["alert"] for rule in ALERT_RULES])
def test_alert_is_complete(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
    assert isinstance(rule["expr"], str)
    assert rule["expr"].strip()
    assert isinstance(rule["for"], str)
    assert DURATION.match(rule["for"]), rule["for"]
    assert rule["labels"]["severity"] in {"warning", "critical"}
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()


@pytest.mark.parametrize("rule", ALERT_RULES, ids=[rule["alert"] for rule in ALERT_RULES])
def test_alert_reads_only_exported_metrics(rule: dict[str, Any]) -> None:
    series = exported_series() | BUILTIN_SERIES
    names = metric_names(rule["expr"])
    assert names, f"{rule['alert']} reads no metric"
    unknown = names - set(series)
    assert not unknown, f"{rule['alert']} reads {sorted(unknown)}, not in {sorted(series)}"
    for name, matchers in selectors(rule["expr"]):
        labels = set(series[name]) | TARGET_LABELS
        assert set(matchers) <= labels, f"{rule['alert']}: {name} has no label {matchers}"
        if name == "outbox_queue_depth" and "state" in matchers:
            # The states refresh_queue_gauges sets.
            assert matchers["state"] in {"queued", "due", "running"}


def test_counters_are_read_with_their_total_suffix() -> None:
    series = exported_series()
    assert "outbox_jobs_dead_total" in series
    assert "outbox_jobs_dead" not in series
    for rule in ALERT_RULES:
        for name in metric_names(rule["expr"]):
            assert not name.endswith("_created"), rule["alert"]


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH")


@needs_promtool
def test_promtool_check_rules() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    """The alerts fire on synthetic series that show each failure, and stay quiet otherwise."""
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
