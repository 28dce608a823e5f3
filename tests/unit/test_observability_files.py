"""The Grafana dashboard, the Prometheus alerts and docs/observability.md.

Every metric name in a dashboard query or an alert must be one that vodq
exports: the list comes from scraping ``/metrics`` of a started service. The
alert rules are checked and unit-tested with promtool (Debian's
``prometheus`` package), and so is the syntax of every dashboard query.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vodq.api.app import create_app
from vodq.config import load_settings
from vodq.service import Service

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DASHBOARD = DOCS / "grafana" / "vodq.json"
ALERTS = DOCS / "prometheus" / "alerts.yml"
ALERTS_TEST = DOCS / "prometheus" / "alerts_test.yml"
OBSERVABILITY = DOCS / "observability.md"
PROMTOOL_TIMEOUT_S = 60

# Metrics that the dashboard or the alerts use before vodq exports them. Each
# entry is a metric still to be added to vodq.metrics, so remove it once it
# lands. The breaker alert's vod_circuit_state is exported already.
PENDING_METRICS: frozenset[str] = frozenset()

# The guide's Grafana queries, which the dashboard uses as they are.
GUIDE_SUCCESS_RATE = (
    "rate(vod_downloads_succeeded_total[5m]) / rate(vod_downloads_started_total[5m])"
)
GUIDE_AVERAGE_DURATION = (
    "rate(vod_download_duration_seconds_sum[5m]) / "
    "rate(vod_download_duration_seconds_count[5m])"
)

PANEL_TITLES = (
    "Active downloads",
    "Queue depth",
    "Queue depth by priority",
    "Download success rate",
    "Average download time",
    "Failures by error class",
    "Bytes downloaded",
    "Retries",
    "Circuit breaker",
)
ALERT_NAMES = {
    "VodqQueueNotMoving",
    "VodqDownloadFailureRateHigh",
    "VodqCircuitBreakerOpen",
}
GRID_COLUMNS = 24


# -- PromQL and the exposition format -----------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Names of the series that a PromQL expression selects."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        after = text[match.end() :].lstrip()
        before = text[: match.start()]
        if after.startswith("(") or name.lower() in _KEYWORDS:
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue
        names.add(name)
    return names


def exported_series(exposition: str) -> set[str]:
    """Series names a Prometheus server can query from this scrape."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + part for part in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def metric_families(exposition: str) -> set[str]:
    """Exported metric names without the client's ``_created`` companions."""
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(exposition)
        if not family.name.endswith("_created")
    }


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The response body of ``GET /metrics`` on a started service."""
    # conftest's make_service is function-scoped; this one serves the module.
    data_dir = tmp_path_factory.mktemp("metrics") / "data"
    settings = load_settings({"DATA_DIR": str(data_dir)}, env_file=None)
    service = Service(settings, run_worker=False)
    service.start()
    try:
        app = create_app(service, manage_lifecycle=False)

        async def scrape() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver"
            ) as client:
                return await client.get("/metrics")

        response = asyncio.run(scrape())
    finally:
        service.stop()
    response.raise_for_status()
    return response.text


@pytest.fixture(scope="module")
def exported(exposition: str) -> set[str]:
    return exported_series(exposition)


# -- the files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


@pytest.fixture(scope="module")
def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard["panels"])


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def panel_queries(panels: list[dict[str, Any]]) -> list[str]:
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def panel_titled(panels: list[dict[str, Any]], title: str) -> dict[str, Any]:
    matches = [panel for panel in panels if panel["title"] == title]
    assert len(matches) == 1, f"expected one panel titled {title!r}"
    return matches[0]


def every_expression(
    panels: list[dict[str, Any]], rules: list[dict[str, Any]]
) -> list[str]:
    return panel_queries(panels) + [rule["expr"] for rule in rules]


# -- metric names -------------------------------------------------------------------


def test_metric_names_used_are_exported(
    panels: list[dict[str, Any]], rules: list[dict[str, Any]], exported: set[str]
) -> None:
    used = set().union(*map(promql_metric_names, every_expression(panels, rules)))
    assert used - exported - PENDING_METRICS == set()


def test_pending_metrics_not_yet_exported(exported: set[str]) -> None:
    # A metric vodq exports now no longer belongs in PENDING_METRICS.
    assert PENDING_METRICS & exported == set()


def test_metric_name_parser_finds_guide_names() -> None:
    names = promql_metric_names(
        'sum by (job) (rate(vod_a_total{state="x"}[5m] offset 1h)) / on (job) vod_b'
    )
    assert names == {"vod_a_total", "vod_b"}


def test_every_exported_metric_is_documented(exposition: str) -> None:
    text = OBSERVABILITY.read_text()
    missing = {name for name in metric_families(exposition) if f"`{name}`" not in text}
    assert missing == set()


# -- the dashboard -------------------------------------------------------------------


def test_dashboard_schema_version_is_current(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39


def test_dashboard_declares_prometheus_input(dashboard: dict[str, Any]) -> None:
    inputs = {item["name"]: item for item in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"


def test_dashboard_queries_use_input_datasource(panels: list[dict[str, Any]]) -> None:
    sources = [panel["datasource"] for panel in panels]
    sources += [target["datasource"] for panel in panels for target in panel["targets"]]
    assert all(
        source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for source in sources
    )


def test_dashboard_panel_ids_are_unique(panels: list[dict[str, Any]]) -> None:
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))


def test_dashboard_panels_fit_without_overlap(panels: list[dict[str, Any]]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


@pytest.mark.parametrize("title", PANEL_TITLES)
def test_dashboard_has_panel(panels: list[dict[str, Any]], title: str) -> None:
    assert panel_titled(panels, title)


def test_dashboard_success_rate_is_guide_query(panels: list[dict[str, Any]]) -> None:
    panel = panel_titled(panels, "Download success rate")
    assert [target["expr"] for target in panel["targets"]] == [GUIDE_SUCCESS_RATE]


def test_dashboard_average_time_is_guide_query(panels: list[dict[str, Any]]) -> None:
    panel = panel_titled(panels, "Average download time")
    assert [target["expr"] for target in panel["targets"]] == [GUIDE_AVERAGE_DURATION]


def test_dashboard_priority_panel_points_to_status(
    panels: list[dict[str, Any]],
) -> None:
    panel = panel_titled(panels, "Queue depth by priority")
    assert "/status" in panel["description"]
    assert ".queue_by_priority" in panel["description"]


@pytest.mark.parametrize(
    ("title", "metric"),
    [
        ("Active downloads", "vod_active_downloads"),
        ("Queue depth", "vod_queue_depth"),
        ("Queue depth", "vod_queue_vods"),
        ("Failures by error class", "vod_downloads_failed_total"),
        ("Bytes downloaded", "vod_downloaded_bytes_total"),
        ("Retries", "vod_download_retries_total"),
        ("Circuit breaker", "vod_circuit_state"),
    ],
)
def test_dashboard_panel_queries_metric(
    panels: list[dict[str, Any]], title: str, metric: str
) -> None:
    queries = [
        target["expr"]
        for panel in panels
        if panel["title"] == title
        for target in panel["targets"]
    ]
    assert any(metric in promql_metric_names(query) for query in queries)


# -- the alerts ----------------------------------------------------------------------


def test_alert_names_are_expected(rules: list[dict[str, Any]]) -> None:
    assert {rule["alert"] for rule in rules} == ALERT_NAMES


@pytest.mark.parametrize("field", ["expr", "for", "labels", "annotations"])
def test_alert_rule_has_field(rules: list[dict[str, Any]], field: str) -> None:
    assert all(field in rule for rule in rules)


def test_alert_rules_set_severity(rules: list[dict[str, Any]]) -> None:
    severities = {rule["labels"]["severity"] for rule in rules}
    assert severities <= {"warning", "critical"}


@pytest.mark.parametrize("annotation", ["summary", "description"])
def test_alert_rule_has_annotation(
    rules: list[dict[str, Any]], annotation: str
) -> None:
    assert all(rule["annotations"].get(annotation) for rule in rules)


@pytest.mark.parametrize(
    ("alert", "metric"),
    [
        ("VodqQueueNotMoving", "vod_downloads_started_total"),
        ("VodqQueueNotMoving", "vod_queue_depth"),
        ("VodqDownloadFailureRateHigh", "vod_downloads_failed_total"),
        ("VodqCircuitBreakerOpen", "vod_circuit_state"),
    ],
)
def test_alert_uses_metric(
    rules: list[dict[str, Any]], alert: str, metric: str
) -> None:
    rule = next(rule for rule in rules if rule["alert"] == alert)
    assert metric in promql_metric_names(rule["expr"])


def test_alert_tests_cover_every_alert(rules: list[dict[str, Any]]) -> None:
    document = yaml.safe_load(ALERTS_TEST.read_text())
    tested = {
        case["alertname"]
        for test in document["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == {rule["alert"] for rule in rules}


@pytest.mark.parametrize("name", sorted(ALERT_NAMES))
def test_observability_doc_explains_alert(name: str) -> None:
    assert f"**{name}**" in OBSERVABILITY.read_text()


# -- promtool ------------------------------------------------------------------------


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path is not None, (
        "promtool is missing; install it with "
        "'apt-get install -y --no-install-recommends prometheus'"
    )
    return subprocess.run(
        [path, *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        cwd=cwd,
        check=False,
    )


def test_promtool_accepts_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_dashboard_queries(
    panels: list[dict[str, Any]], tmp_path: Path
) -> None:
    # Each query as a recording rule, so that promtool parses it.
    records = [
        {"record": f"dashboard:query_{index}", "expr": expr}
        for index, expr in enumerate(panel_queries(panels))
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]})
    )
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
