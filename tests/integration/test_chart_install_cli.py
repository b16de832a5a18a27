"""`kubetune submit|status|cluster-versions` against the real test API server (v1.20).

The operator is not running here: the test plays it by patching status through the /status
subresource, exactly what the operator and the trainer's per-job Role do. `kubetune logs` is
checked up to finding the pods (the test server has no kubelet to serve pod logs).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_cli import cluster as cli_cluster
from tests.cluster.cluster import LocalCluster
from tests.integration.test_chart_install import install_crds
from tests.unit.test_chart_cli import parser

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "quickstart" / "finetunejob.yaml"


def run(cluster: LocalCluster, *argv: str) -> int:
    args = parser().parse_args([*argv, "--kubeconfig", str(cluster.kubeconfig)])
    return int(args.func(args))


def patch_status(kube_api: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
    from kubernetes import client

    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", name, {"status": status}
    )


def test_submit_status_watch_versions(
    kube_cluster: LocalCluster,
    kube_api: Any,
    kube_namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kubernetes import client

    install_crds(kube_api)
    ns = kube_namespace
    assert run(kube_cluster, "submit", str(EXAMPLE), "-n", ns) == 0
    assert f"finetunejob.kubetune.io/quickstart created (namespace {ns})" in capsys.readouterr().out
    assert run(kube_cluster, "submit", str(EXAMPLE), "-n", ns) == 0
    assert "quickstart unchanged" in capsys.readouterr().out

    changed = tmp_path / "job.yaml"
    doc = yaml.safe_load(EXAMPLE.read_text())
    epochs = doc["spec"]["training"]["epochs"] + 1
    doc["spec"]["training"]["epochs"] = epochs
    changed.write_text(yaml.safe_dump(doc))
    assert run(kube_cluster, "submit", str(changed), "-n", ns) == 0
    assert "quickstart configured" in capsys.readouterr().out
    custom = client.CustomObjectsApi(kube_api)
    obj = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs", "quickstart")
    assert obj["metadata"]["generation"] == 2 and obj["spec"]["training"]["epochs"] == epochs

    # Not picked up by an operator yet.
    assert run(kube_cluster, "status", "quickstart", "-n", ns) == 0
    assert capsys.readouterr().out.strip() == "quickstart: Unknown"

    patch_status(
        kube_api,
        ns,
        "quickstart",
        {
            "phase": "Running",
            "stage": "Training",
            "observedGeneration": 2,
            "progress": {"step": 10, "totalSteps": 40, "percent": 25, "summary": "10/40 (25%)", "loss": 2.5},
        },
    )
    assert run(kube_cluster, "status", "quickstart", "-n", ns) == 0
    assert capsys.readouterr().out.strip() == "quickstart: Running, Training, 10/40 (25%), loss 2.5"

    def operator_finishes() -> None:
        time.sleep(1.0)
        patch_status(
            kube_api, ns, "quickstart", {"progress": {"step": 30, "summary": "30/40 (75%)", "loss": 1.5}}
        )
        time.sleep(1.0)
        patch_status(
            kube_api,
            ns,
            "quickstart",
            {
                "phase": "Succeeded",
                "reason": "Published",
                "message": "published v1",
                "version": {
                    "name": "v1",
                    "uri": "s3://kubetune-demo/models/x/versions/v1",
                    "manifestDigest": "sha256:x",
                },
            },
        )

    worker = threading.Thread(target=operator_finishes)
    worker.start()
    try:
        assert run(kube_cluster, "status", "quickstart", "-n", ns, "--watch", "--timeout", "60") == 0
    finally:
        worker.join()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "quickstart: Running, Training, 10/40 (25%), loss 2.5"
    assert "quickstart: Running, Training, 30/40 (75%), loss 1.5" in lines
    assert lines[-1] == "quickstart: Succeeded, 30/40 (75%), loss 1.5, version v1, Published: published v1"

    # The training Job is not known to the status here (no operator): logs says so.
    assert run(kube_cluster, "logs", "quickstart", "-n", ns) == 2
    assert "has no training Job yet" in capsys.readouterr().err

    for version in ("v1", "v2"):
        custom.create_namespaced_custom_object(
            "kubetune.io",
            "v1alpha1",
            ns,
            "modelversions",
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "ModelVersion",
                "metadata": {
                    "name": f"tiny-demo-translator-{version}",
                    "labels": {"kubetune.io/model": "tiny-demo-translator"},
                },
                "spec": {
                    "model": "tiny-demo-translator",
                    "version": version,
                    "uri": f"s3://kubetune-demo/models/tiny-demo-translator/versions/{version}",
                    "manifestDigest": "sha256:" + "c" * 64,
                    "base": "s3://kubetune-demo/base-models/tiny-llama-demo",
                    "keyMetric": "eval_loss=1.5",
                },
            },
        )
    assert run(kube_cluster, "cluster-versions", "-n", ns, "--model", "tiny-demo-translator") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["MODEL", "VERSION", "BASE", "METRIC", "GATES", "URI"]
    assert [row.split()[1] for row in table[1:]] == ["v1", "v2"]
    assert run(kube_cluster, "cluster-versions", "-n", ns, "--model", "other") == 0
    assert capsys.readouterr().out.strip() == "No ModelVersions found."


def test_status_of_a_missing_job_is_a_clear_error(
    kube_cluster: LocalCluster, kube_api: Any, kube_namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    install_crds(kube_api)
    assert run(kube_cluster, "status", "nope", "-n", kube_namespace) == cli_cluster.EXIT_USAGE
    assert f"finetunejob {kube_namespace}/nope: not found" in capsys.readouterr().err
