"""The chart's Grafana dashboard and PrometheusRule, rendered by the real Helm engine.

Rule syntax is checked by Prometheus's own ``promtool check rules`` (Debian's prometheus package,
`make tools`); that every query returns series from a real Prometheus scraping a real operator is
tests/integration/test_observability.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.unit.test_chart import CHART, K8S_VERSION, by_kind, render, render_objects

ON: dict[str, Any] = {
    "metrics": {
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "kubetune"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    }
}
ALERTS = {
    "KubetuneFineTuneJobFailed",
    "KubetuneFineTuneJobStalled",
    "KubetuneTrainerProgressStopped",
    "KubetuneReconcileErrors",
    "KubetuneFineTuneJobsQueuedLong",
}
#: Every metric the operator exports (operator/kubetune_operator/metrics.py), without suffixes.
OPERATOR_METRICS = {
    "kubetune_finetunejobs",
    "kubetune_reconcile_duration_seconds",
    "kubetune_reconcile_errors_total",
    "kubetune_modelversions_created_total",
    "kubetune_finetunejob_stalled",
    "kubetune_finetunejob_failures_total",
    "kubetune_finetunejob_progress_percent",
    "kubetune_finetunejob_progress_updated_timestamp_seconds",
}


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\bkubetune_[a-z_]+\b", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def rules_file(objs: list[dict[str, Any]], dest: Path) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file (what the Prometheus Operator mounts)."""
    (rule,) = by_kind(objs, "PrometheusRule")
    dest.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return dest


def test_both_are_off_by_default() -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render_objects()}
    assert ("PrometheusRule", "kubetune-operator") not in kinds
    assert not [k for k in kinds if k[1].endswith("-dashboard")]
    # Off with metrics.enabled: false too (nothing would be scraped).
    off = render_objects({"metrics": {**ON["metrics"], "enabled": False}})
    assert (
        by_kind(off, "PrometheusRule") == []
        and [o for o in off if "dashboard" in o["metadata"]["name"]] == []
    )


def test_chart_lints_clean_with_both_enabled() -> None:
    report = helm.lint(CHART, ON, strict=True, namespace="kubetune-system", kube_version="v1.31.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], problems


def test_dashboard_configmap_carries_the_sidecar_label_and_the_json() -> None:
    objs = render_objects({"metrics": {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}})
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    rendered = json.loads(cm["data"]["kubetune-operator.json"])
    assert rendered == json.loads((CHART / "dashboards" / "kubetune-operator.json").read_text())
    assert rendered["uid"] == "kubetune-operator" and rendered["panels"]


def test_dashboard_reads_every_operator_metric_and_no_other() -> None:
    dashboard = json.loads((CHART / "dashboards" / "kubetune-operator.json").read_text())
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
    assert used == OPERATOR_METRICS
    # Panels are addressable and do not overlap ids; every target names the datasource variable.
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] for t in p["targets"])


def test_prometheus_rule_has_the_alerts_that_matter_with_values_applied() -> None:
    values = {
        "metrics": {"prometheusRule": {"enabled": True, "progressStaleSeconds": 600, "stalledFor": "5m"}}
    }
    (rule,) = by_kind(render_objects(values), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == ALERTS
    assert alerts["KubetuneTrainerProgressStopped"]["expr"].endswith("> 600")
    assert alerts["KubetuneFineTuneJobStalled"]["for"] == "5m"
    for alert in alerts.values():
        assert alert["labels"]["severity"] and alert["annotations"]["summary"]
        assert metric_names(alert["expr"]) <= OPERATOR_METRICS


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: run `make tools`")
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    path = rules_file(render_objects(ON), tmp_path / "rules.yaml")
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"metrics": {"prometheusRule": {"stalledFor": "soon"}}}, "stalledFor"),
        ({"metrics": {"prometheusRule": {"progressStaleSeconds": 0}}}, "progressStaleSeconds"),
        ({"metrics": {"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}}}, "grafana_dashboard"),
    ],
)
def test_values_schema_rejects_bad_observability_values(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert needle in str(err.value)
