"""The chart's dashboard and alerts against a real Prometheus scraping the real operator.

Real: the v1.20 API server (tests/cluster), the operator process under its least-privilege token with
its /metrics on 127.0.0.1, Prometheus 2.42 (Debian, `make tools`) scraping it every second and
evaluating the PrometheusRule the chart renders (Helm v4 engine). Training pods run a TEST DOUBLE of
the trainer: it reports progress once (status.progress.updatedAt, as the real trainer's reporter
writes it) and then goes silent, as a hung trainer would.

Proved: every dashboard query and every alert expression parses and returns series; every metric an
alert reads is scraped; a FineTuneJob that fails (a guard rail) fires KubetuneFineTuneJobFailed and a
silent trainer fires KubetuneTrainerProgressStopped. Not run: Grafana itself (the dashboard JSON is
checked for its queries, not drawn) and the Prometheus Operator (the rule file is the PrometheusRule's
spec.groups, which is what it mounts).
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster.cluster import free_port
from tests.fixtures.operator import Api, OperatorProcess, finetunejob, wait_for
from tests.support.prometheus import PrometheusServer
from tests.unit.test_chart import CHART, render_objects
from tests.unit.test_chart_observability import dashboard_exprs, metric_names, rules_file

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus missing: run `make tools`"),
]

#: TEST DOUBLE of the trainer: one progress report stamped now, then silence (never finishes).
SILENT_TRAINER = r"""
import datetime, json, os, ssl, time, urllib.request
ns, name = os.environ["KUBETUNE_NAMESPACE"], os.environ["KUBETUNE_JOB_NAME"]
sa = os.environ["KUBETUNE_SA_DIR"]
url = "https://%s:%s/apis/kubetune.io/v1alpha1/namespaces/%s/finetunejobs/%s/status" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"], ns, name)
ctx = ssl.create_default_context(cafile=os.path.join(sa, "ca.crt"))
token = open(os.path.join(sa, "token")).read().strip()
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
body = {"status": {"stage": "Training", "progress": {"stage": "Training", "step": 3, "totalSteps": 10,
        "percent": 30.0, "summary": "3/10 (30%)", "updatedAt": now}}}
req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PATCH",
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/merge-patch+json"})
urllib.request.urlopen(req, context=ctx, timeout=10).read()
while True:
    time.sleep(1)
"""
STALE_SECONDS = 4


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    started: list[PrometheusServer] = []

    def start(targets: list[str], rule_files: list[Path]) -> PrometheusServer:
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        server = PrometheusServer(workdir, targets, rule_files)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


def _firing(prom: PrometheusServer, alert: str) -> list[dict[str, str]]:
    return [
        a["labels"] for a in prom.alerts() if a["labels"]["alertname"] == alert and a["state"] == "firing"
    ]


def test_dashboard_and_alerts_over_the_running_operator(
    api: Api,
    operator_factory: Callable[..., OperatorProcess],
    prometheus_factory: Callable[..., PrometheusServer],
    tmp_path: Path,
) -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True, "progressStaleSeconds": STALE_SECONDS}}}
    rules = rules_file(render_objects(values), tmp_path / "kubetune-rules.yaml")
    port = free_port()
    op = operator_factory(
        ["python", "-c", SILENT_TRAINER],
        KUBETUNE_OPERATOR_METRICS_PORT=str(port),
        KUBETUNE_OPERATOR_METRICS_ADDRESS="127.0.0.1",
        KUBETUNE_OPERATOR_ALLOWED_OUTPUT_PREFIXES="s3://registry",
    )
    prom = prometheus_factory([f"127.0.0.1:{port}"], [rules])

    # A guard rail makes this one fail at once (InvalidSpec); the other runs and then goes silent.
    api.create_ftj(finetunejob("refused", "tiny-refused", output={"uri": "s3://elsewhere/models"}))
    api.create_ftj(finetunejob("hung", "tiny-hung"))
    wait_for("the operator's /metrics scraped", prom.targets_up, 60, op.log)
    wait_for("refused Failed", lambda: api.status("refused").get("phase") == "Failed", 60, op.log)
    wait_for(
        "hung Running with a progress report",
        lambda: api.status("hung").get("phase") == "Running"
        and (api.status("hung").get("progress") or {}).get("updatedAt"),
        90,
        op.log,
    )

    # The failure alert fires for real, naming the namespace and the reason.
    firing = wait_for(
        "KubetuneFineTuneJobFailed firing",
        lambda: _firing(prom, "KubetuneFineTuneJobFailed"),
        60,
        prom.log,
    )
    assert {(a["namespace"], a["reason"]) for a in firing} == {(api.ns, "InvalidSpec")}
    # The silent trainer: the operator mirrors its last report; past the threshold the alert fires.
    firing = wait_for(
        "KubetuneTrainerProgressStopped firing",
        lambda: _firing(prom, "KubetuneTrainerProgressStopped"),
        60,
        prom.log,
    )
    assert [(a["namespace"], a["finetunejob"]) for a in firing] == [(api.ns, "hung")]

    # Every dashboard query parses and returns series (rates need a few scrapes: wait for them).
    dashboard = json.loads((CHART / "dashboards" / "kubetune-operator.json").read_text())
    for expr in dashboard_exprs(dashboard):
        wait_for(
            f"series for the dashboard query {expr!r}", functools.partial(prom.query, expr), 30, prom.log
        )
    # Every alert expression parses and every metric it reads is scraped; the two produced above
    # return their series.
    (rule,) = [o for o in render_objects(values) if o["kind"] == "PrometheusRule"]
    for alert in rule["spec"]["groups"][0]["rules"]:
        result = prom.query(alert["expr"])
        if alert["alert"] in ("KubetuneFineTuneJobFailed", "KubetuneTrainerProgressStopped"):
            assert result, alert["alert"]
        for name in metric_names(alert["expr"]):
            selector = name + "_count" if name == "kubetune_reconcile_duration_seconds" else name
            assert prom.query(f"count({selector})"), f"{alert['alert']} reads {name}, which is not scraped"
    stalled = prom.query(f'kubetune_finetunejob_stalled{{namespace="{api.ns}"}}')
    assert {s["metric"]["finetunejob"] for s in stalled} == {"refused", "hung"}
