"""The Helm chart, linted and rendered by the real Helm engine (helm-python-sdk, Helm v4 Go SDK).

Every rendered object is validated against the Kubernetes 1.31 OpenAPI definitions (strict: unknown
fields are errors). The RBAC is compared rule by rule with the operator's own rbac.yaml, and the
settings ConfigMap is fed through the operator's real settings loader, so the chart cannot drift from
what the operator reads and needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from kubetune_api import crdgen
from kubetune_operator.rbac import operator_cluster_roles
from kubetune_operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
K8S_VERSION = "1.31.0"
#: Kinds that are not in the Kubernetes OpenAPI definitions; checked against their own CRDs below.
CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "ha-locked-down": {
        "replicaCount": 3,
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "image": {"digest": "sha256:" + "a" * 64},
        "trainer": {
            "image": {"repository": "registry.example.com/kubetune/trainer", "tag": "0.1.0-cuda12.4"},
            "allowedImages": ["registry.example.com/kubetune/"],
            "imagePullSecrets": ["regcred"],
            "extraEnv": {"NCCL_DEBUG": "WARN"},
            "defaultResources": {"cpu": "8", "memory": "64Gi", "ephemeralStorage": "200Gi"},
        },
        "guardRails": {
            "maxNodes": 2,
            "maxGpusPerJob": 16,
            "allowedOutputPrefixes": ["s3://models/"],
            "allowedBaseModelPrefixes": ["s3://models/", "modelversion://"],
        },
    },
    "no-metrics": {"metrics": {"enabled": False}, "serviceAccount": {"create": False, "name": "existing"}},
    "node-cache-pvc": {
        "trainerCache": {
            "enabled": True,
            "persistentVolumeClaim": "kubetune-cache",
            "maxBytes": 500 * 1024**3,
        }
    },
}


def render(values: dict[str, Any] | None = None, namespace: str = "kubetune-system") -> dict[str, str]:
    """Template path -> rendered text, as `helm template kubetune charts/kubetune` would give."""
    chart = helm.Chart.load(CHART)
    return chart.render(values or {}, name="kubetune", namespace=namespace, is_install=True)


def render_objects(
    values: dict[str, Any] | None = None, namespace: str = "kubetune-system"
) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object (NOTES.txt left out)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(render(values, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def chart_crds() -> list[dict[str, Any]]:
    """The CRDs Helm installs from the chart's crds/ folder."""
    docs: list[dict[str, Any]] = []
    for entry in helm.Chart.load(CHART).crds:
        docs.extend(d for d in yaml.safe_load_all(entry["data"]) if d)
    return docs


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def settings_from(objs: list[dict[str, Any]]) -> OperatorSettings:
    """What the operator would load from the chart's ConfigMap plus the container's own env."""
    (cm,) = by_kind(objs, "ConfigMap")
    (deploy,) = by_kind(objs, "Deployment")
    env = {
        e["name"]: e["value"]
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    return OperatorSettings.from_env({**cm["data"], **env})


def _rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# --- lint, schema, validity -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_lints_clean_in_strict_mode(name: str) -> None:
    report = helm.lint(
        CHART, VALUE_SETS[name], strict=True, namespace="kubetune-system", kube_version="v1.31.0"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], problems


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes(name: str) -> None:
    objs = render_objects(VALUE_SETS[name])
    assert objs
    for obj in objs:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_custom_objects_match_their_crds() -> None:
    import jsonschema

    crds = {c["spec"]["names"]["kind"]: c for c in chart_crds()}
    objs = render_objects(VALUE_SETS["namespaced"]) + render_objects()
    peerings = [o for o in objs if o["kind"] in ("KopfPeering", "ClusterKopfPeering")]
    assert {p["kind"] for p in peerings} == {"KopfPeering", "ClusterKopfPeering"}
    for obj in peerings:
        crd = crds[obj["kind"]]
        assert obj["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
        assert ("namespace" in obj["metadata"]) == (crd["spec"]["scope"] == "Namespaced")
        jsonschema.validate(obj, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    (monitor,) = by_kind(render_objects(VALUE_SETS["ha-locked-down"]), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"replicaCount": 0}, "replicaCount"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"guardRails": {"maxNodes": "eight"}}, "maxNodes"),
        ({"trainer": {"extraEnv": {"AWS_SECRET_ACCESS_KEY": "x"}}}, "AWS_SECRET_ACCESS_KEY"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"trainerCache": {"hostPath": "var/cache"}}, "hostPath"),
        ({"trainerCache": {"maxBytes": -1}}, "maxBytes"),
        ({"trainerCache": {"size": "10Gi"}}, "size"),
    ],
)
def test_values_schema_rejects_bad_values_naming_the_key(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert needle in str(err.value)


# --- CRDs ---------------------------------------------------------------------------------------


def test_chart_crds_are_the_generated_ones_plus_kopf_peerings() -> None:
    for name in crdgen.build_crds():
        assert (CHART / "crds" / name).read_text() == (REPO / "crds" / name).read_text(), (
            f"charts/kubetune/crds/{name} differs: run `python -m kubetune_api.crdgen`"
        )
    peering = REPO / "operator" / "kubetune_operator" / "peering-crds.yaml"
    assert list(yaml.safe_load_all((CHART / "crds" / "kopf-peerings.yaml").read_text())) == list(
        yaml.safe_load_all(peering.read_text())
    ), f"charts/kubetune/crds/kopf-peerings.yaml differs from {peering}"
    names = sorted(c["metadata"]["name"] for c in chart_crds())
    assert names == [
        "clusterkopfpeerings.kopf.dev",
        "finetunejobs.kubetune.io",
        "finetunesweeps.kubetune.io",
        "kopfpeerings.kopf.dev",
        "modelversions.kubetune.io",
    ]
    for crd in chart_crds():
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_crdgen_check_covers_the_chart_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune_api import crdgen

    shutil.copytree(REPO / "crds", tmp_path / "crds")
    shutil.copytree(CHART / "crds", tmp_path / "charts" / "kubetune" / "crds")
    assert crdgen.main(["--repo", str(tmp_path), "--check"]) == 0
    target = tmp_path / "charts" / "kubetune" / "crds" / "finetunejobs.kubetune.io.yaml"
    target.write_text(target.read_text().replace("maximum: 256", "maximum: 9999"))
    assert crdgen.main(["--repo", str(tmp_path), "--check"]) == 1
    assert "charts/kubetune/crds/finetunejobs.kubetune.io.yaml" in capsys.readouterr().err


# --- RBAC -----------------------------------------------------------------------------------------


def test_rbac_is_exactly_the_operators_rules() -> None:
    expected = {r["metadata"]["name"]: _rule_set(r["rules"]) for r in operator_cluster_roles()}
    roles = by_kind(render_objects(), "ClusterRole")
    got = {r["metadata"]["name"]: _rule_set(r["rules"]) for r in roles}
    assert sorted(got.values(), key=sorted) == sorted(expected.values(), key=sorted)
    assert got["kubetune-operator-cluster"] == expected["kubetune-operator-cluster"]
    assert got["kubetune-operator"] == expected["kubetune-operator"]


def test_rbac_has_no_wildcards_no_secrets_no_exec() -> None:
    for values in VALUE_SETS.values():
        for role in by_kind(render_objects(values), "ClusterRole") + by_kind(render_objects(values), "Role"):
            for group, resource, verb in _rule_set(role["rules"]):
                assert "*" not in (group, resource, verb), role["metadata"]["name"]
                assert resource != "secrets", "the operator must never read Secrets"
                assert resource not in ("pods/exec", "pods/attach", "pods/portforward", "pods/log")
                assert verb not in ("escalate", "bind", "impersonate")


def test_every_rbac_rule_has_a_comment_saying_why() -> None:
    lines = (CHART / "templates" / "rbac.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert len(rules) == sum(len(r["rules"]) for r in operator_cluster_roles())
    for i in rules:
        assert lines[i - 1].strip().startswith("#"), f"templates/rbac.yaml:{i + 1}: rule without a comment"


def test_cluster_wide_mode_binds_everywhere_namespaced_mode_only_listed_namespaces() -> None:
    wide = render_objects()
    assert {b["roleRef"]["name"] for b in by_kind(wide, "ClusterRoleBinding")} == {
        "kubetune-operator",
        "kubetune-operator-cluster",
    }
    assert by_kind(wide, "RoleBinding") == []
    assert [p["metadata"]["name"] for p in by_kind(wide, "ClusterKopfPeering")] == ["kubetune-operator"]

    narrow = render_objects(VALUE_SETS["namespaced"])
    assert {b["roleRef"]["name"] for b in by_kind(narrow, "ClusterRoleBinding")} == {
        "kubetune-operator-cluster"
    }
    bindings = by_kind(narrow, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": "kubetune-system"}
        ]
    assert sorted(p["metadata"]["namespace"] for p in by_kind(narrow, "KopfPeering")) == ["team-a", "team-b"]
    assert by_kind(narrow, "ClusterKopfPeering") == []
    assert settings_from(narrow).namespaces == ("team-a", "team-b")


# --- the operator's settings and pod ------------------------------------------------------------


def test_settings_configmap_is_what_the_operator_loads() -> None:
    defaults = settings_from(render_objects())
    assert defaults.namespaces == ()
    assert defaults.trainer_image == "ghcr.io/kubetune/trainer:0.1.0"
    assert defaults.standalone is False and defaults.peering_name == "kubetune-operator"
    assert defaults.metrics_port == 9090 and defaults.default_ephemeral_storage is None
    # The chart's defaults are the operator's own defaults, so the docs describe one behaviour.
    code_defaults = OperatorSettings()
    for field in (
        "max_nodes",
        "max_gpus_per_job",
        "default_cpu",
        "default_memory",
        "run_as_user",
        "resync_seconds",
    ):
        assert getattr(defaults, field) == getattr(code_defaults, field), field

    tuned = settings_from(render_objects(VALUE_SETS["ha-locked-down"]))
    assert tuned.trainer_image == "registry.example.com/kubetune/trainer:0.1.0-cuda12.4"
    assert tuned.allowed_images == ("registry.example.com/kubetune/",)
    assert tuned.image_pull_secrets == ("regcred",)
    assert (tuned.max_nodes, tuned.max_gpus_per_job) == (2, 16)
    assert tuned.allowed_base_model_prefixes == ("s3://models/", "modelversion://")
    assert tuned.extra_env == {"NCCL_DEBUG": "WARN"}
    assert tuned.default_ephemeral_storage == "200Gi"

    assert settings_from(render_objects(VALUE_SETS["no-metrics"])).metrics_port is None


def test_trainer_cache_values_reach_the_operator_settings() -> None:
    """trainerCache: off by default; a node folder or a PVC when enabled; the bound as exact bytes."""
    code_defaults = OperatorSettings()
    off = settings_from(render_objects())
    assert off.trainer_cache_host_path is None and off.trainer_cache_pvc is None
    assert off.trainer_cache_max_bytes == code_defaults.trainer_cache_max_bytes
    host = settings_from(render_objects({"trainerCache": {"enabled": True, "maxBytes": 123456789012}}))
    assert host.trainer_cache_host_path == "/var/cache/kubetune" and host.trainer_cache_pvc is None
    assert host.trainer_cache_max_bytes == 123456789012  # not rounded through a float
    pvc = settings_from(render_objects(VALUE_SETS["node-cache-pvc"]))
    assert pvc.trainer_cache_pvc == "kubetune-cache" and pvc.trainer_cache_host_path is None
    assert pvc.trainer_cache_max_bytes == 500 * 1024**3


def test_operator_pod_is_restricted_and_probes_the_health_endpoint() -> None:
    objs = render_objects()
    (deploy,) = by_kind(objs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = settings_from(objs)
    assert settings.liveness_endpoint == f"http://0.0.0.0:{ports['health']}/healthz"
    assert settings.metrics_port == ports["metrics"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["serviceAccountName"] == "kubetune-operator"
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert "command" not in container  # one replica: the image's entry point, priority 0


@pytest.mark.skipif(shutil.which("cksum") is None, reason="needs coreutils' cksum, as the operator image has")
def test_replicas_get_distinct_peering_priorities(tmp_path: Path) -> None:
    """Runs the container's shell command with a stand-in operator that prints its priority."""
    (deploy,) = by_kind(render_objects({"replicaCount": 3}), "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert deploy["spec"]["replicas"] == 3 and "strategy" not in deploy["spec"]
    fake = tmp_path / "kubetune-operator"
    fake.write_text('#!/bin/sh\necho "$KUBETUNE_OPERATOR_PRIORITY"\n')
    fake.chmod(0o755)
    priorities = set()
    for pod_name in (
        "kubetune-operator-7d9f-abcde",
        "kubetune-operator-7d9f-fghij",
        "kubetune-operator-7d9f-klmno",
    ):
        env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "KUBETUNE_POD_NAME": pod_name}
        out = subprocess.run(container["command"], env=env, capture_output=True, text=True, check=True).stdout
        priority = OperatorSettings.from_env({"KUBETUNE_OPERATOR_PRIORITY": out.strip()}).priority
        priorities.add(priority)
    assert len(priorities) == 3


def test_network_policy_admits_only_probes_and_scrapes() -> None:
    (policy,) = by_kind(render_objects(VALUE_SETS["ha-locked-down"]), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ingress_ports == ["health", "metrics"]
    assert policy["spec"]["ingress"][1]["from"] == [
        {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    ]
    egress_ports = sorted(p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"])
    assert egress_ports == [53, 53, 443, 6443]
    assert by_kind(render_objects(), "NetworkPolicy") == []


def test_notes_tell_the_next_step() -> None:
    notes = render(VALUE_SETS["namespaced"])["kubetune/templates/NOTES.txt"]
    assert "serving namespaces: team-a, team-b" in notes
    assert "create secret generic s3-credentials" in notes
    assert "kubectl -n TEAM get ftj -w" in notes
    assert "spec.image overrides are refused" in notes
