"""CRD admission on a real Kubernetes 1.36 API server (apiextensions-apiserver v1.36.4, see
tests/cluster/build-apiextensions.sh): what `kubectl apply -f crds/` and `helm install` meet on a
current cluster, and what the server then does with FineTuneJobs and ModelVersions.

Every assertion here is about a real server response: status codes, ``Warning`` headers, error
messages and causes, objects as stored (defaults applied, unknown fields pruned), Table output and
the published OpenAPI v3 document. The CEL cost figures are the server's own estimates, read from
the cost errors it returns for dry-run probe CRDs (see :func:`_measure_rule_cost`).

Workload behaviour (Jobs, pods, RBAC, garbage collection, the operator) is not here: this server
has no core API. That is the v1.20 tier (tests/cluster/cluster.py).
"""

from __future__ import annotations

import copy
import math
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from kubetune_api import crdgen
from kubetune_api.models import FineTuneJob, ModelVersion
from kubetune_api.sweep import FineTuneSweep
from tests.reliability.corpus import load_corpus, names_field

if TYPE_CHECKING:
    import requests

    from tests.cluster.crd_server import CRDServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "kubetune.io", "v1alpha1"
CRD_FILES = (
    "finetunejobs.kubetune.io.yaml",
    "modelversions.kubetune.io.yaml",
    "finetunesweeps.kubetune.io.yaml",
)
#: Both copies a user can install: `kubectl apply -f crds/` and the Helm chart's crds/ (installed last,
#: it stays installed for the rest of the module).
CRD_SOURCES = {"crds/": REPO / "crds", "charts/kubetune/crds/": REPO / "charts" / "kubetune" / "crds"}
CRD_API = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
PLURAL = {"FineTuneJob": "finetunejobs", "ModelVersion": "modelversions", "FineTuneSweep": "finetunesweeps"}
#: apiextensions validation.go: StaticEstimatedCostLimit (per expression, cardinality included) and
#: StaticEstimatedCRDCostLimit (all expressions of one CRD together).
RULE_COST_LIMIT = 10_000_000
CRD_COST_LIMIT = 100_000_000
_WARNING = re.compile(r'\d{3} \S+ "((?:[^"\\]|\\.)*)"')
_FACTOR = r"exceeds budget by factor of (more than 100x|[0-9.]+x)"
_RULE_COST = re.compile(r"^(?:Forbidden: )?estimated rule cost " + _FACTOR)
_TOTAL_COST = re.compile(r"estimated rule cost total for entire OpenAPIv3 schema " + _FACTOR)


# ------------------------------------------------------------------------------------------ helpers
def warnings_of(response: requests.Response) -> list[str]:
    """The texts of the response's ``Warning`` headers (requests joins repeated headers with ', ')."""
    return _WARNING.findall(response.headers.get("Warning", ""))


def error_text(response: requests.Response) -> str:
    """The Status message and every cause (field + message) of an error response, one per line."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    lines = [str(body.get("message", ""))]
    for cause in (body.get("details") or {}).get("causes", []):
        lines.append(f"{cause.get('field', '')}: {cause.get('message', '')}")
    return "\n".join(lines)


def load_crd(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def resource_path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL[kind]}"
    return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def fresh_namespace() -> str:
    # No Namespace objects exist on this server (no core API); any valid name works.
    return f"t-{uuid.uuid4().hex[:10]}"


def wait_until(what: str, probe: Any, timeout: float = 30.0, detail: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; last seen: {detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{seen}")
        time.sleep(0.1)


def example_documents() -> list[tuple[Path, int, dict[str, Any]]]:
    """Every kubetune object in examples/, found as tests/unit/test_examples.py finds them."""
    out = []
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            ours = isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("kubetune.io/")
            if ours:
                out.append((path, i, doc))
    return out


def minimal_modelversion(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": {
            "model": "support-assistant",
            "version": "v1",
            "uri": "s3://models/support-assistant/versions/v1",
            "manifestDigest": "sha256:" + "a" * 64,
            "base": "s3://models/base/mistral-7b",
            "keyMetric": "eval_loss=1.234",
        },
    }


def quickstart_job(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "quickstart" / "finetunejob.yaml").read_text())
    doc["metadata"] = {"name": name}
    return doc


# ------------------------------------------------------------------------------------- CRD install
@pytest.fixture(scope="module")
def crd_installs(k8s136: CRDServer, k8s136_http: requests.Session) -> dict[str, dict[str, Any]]:
    """Create both CRDs from each source in turn (the first source's are deleted again before the
    next), recording each create response and how long Established took. The chart's copies stay."""
    results: dict[str, dict[str, Any]] = {}
    sources = list(CRD_SOURCES.items())
    for n, (label, folder) in enumerate(sources):
        for file in CRD_FILES:
            crd = load_crd(folder / file)
            started = time.monotonic()
            response = k8s136_http.post(k8s136.url(CRD_API), json=crd, timeout=60)
            record: dict[str, Any] = {
                "status": response.status_code,
                "warnings": warnings_of(response),
                "error": "" if response.ok else error_text(response),
                "conditions": {},
            }
            results[f"{label}{file}"] = record
            if not response.ok:
                continue

            def conditions(name: str = crd["metadata"]["name"]) -> dict[str, str] | None:
                got = k8s136_http.get(k8s136.url(f"{CRD_API}/{name}"), timeout=30).json()
                conds = {c["type"]: c["status"] for c in (got.get("status") or {}).get("conditions") or []}
                return conds if conds.get("Established") == "True" else None

            record["conditions"] = wait_until(f"{file} Established", conditions)
            record["established_seconds"] = time.monotonic() - started
        if n < len(sources) - 1:
            for file in CRD_FILES:
                name = load_crd(folder / file)["metadata"]["name"]
                k8s136_http.delete(k8s136.url(f"{CRD_API}/{name}"), timeout=30)
            for file in CRD_FILES:
                name = load_crd(folder / file)["metadata"]["name"]
                # The server's finalizer (customresourcecleanup) lists and deletes the CRD's objects
                # and then tears its storage down; beside a busy test worker on 2 cores that took
                # over 30 s once (CI of 7052e93), so the wait allows the server's own 1-minute
                # clean-up poll twice over and the failure says what the CRD looked like.
                wait_until(
                    f"{name} deleted",
                    lambda name=name: _deleted(k8s136, k8s136_http, name),
                    timeout=120,
                    detail=lambda name=name: _last_seen.get(name),
                )
    last_label = sources[-1][0]
    broken = {k: v for k, v in results.items() if k.startswith(last_label) and v["status"] != 201}
    if broken:
        pytest.fail(f"the chart's CRDs were not installed: {broken}")
    return results


def _deleted(k8s136: CRDServer, http: requests.Session, name: str) -> bool:
    got = http.get(k8s136.url(f"{CRD_API}/{name}"), timeout=30)
    if got.status_code == 404:
        return True
    _last_seen[name] = (got.json().get("status") or {}).get("conditions")
    return False


#: The last conditions seen of a CRD being deleted (printed when the wait times out).
_last_seen: dict[str, Any] = {}


@pytest.fixture(scope="module")
def installed(
    crd_installs: dict[str, dict[str, Any]], k8s136: CRDServer, k8s136_http: requests.Session
) -> None:
    """The chart's CRDs are installed and their resources served."""

    def served() -> bool:
        r = k8s136_http.get(k8s136.url(resource_path("FineTuneJob", "default")), timeout=30)
        r2 = k8s136_http.get(k8s136.url(resource_path("ModelVersion", "default")), timeout=30)
        return r.status_code == 200 and r2.status_code == 200

    wait_until("the custom resource endpoints", served)


def test_server_is_kubernetes_1_36(k8s136: CRDServer, k8s136_http: requests.Session) -> None:
    version = k8s136_http.get(k8s136.url("/version"), timeout=30).json()
    assert version["gitVersion"] == "v1.36.4", version
    assert (version["major"], version["minor"]) == ("1", "36"), version


def test_both_crd_copies_create_and_become_established_without_warnings(
    crd_installs: dict[str, dict[str, Any]],
) -> None:
    assert set(crd_installs) == {f"{label}{file}" for label in CRD_SOURCES for file in CRD_FILES}
    for name, record in crd_installs.items():
        assert record["status"] == 201, f"{name}: HTTP {record['status']}\n{record['error']}"
        assert record["warnings"] == [], f"{name}: the server warned: {record['warnings']}"
        conds = record["conditions"]
        assert conds.get("Established") == "True" and conds.get("NamesAccepted") == "True", (name, conds)
        assert conds.get("NonStructuralSchema") in (None, "False"), (name, conds)
        assert conds.get("KubernetesAPIApprovalPolicyConformant") in (None, "True"), (name, conds)


def test_the_old_empty_checkpoint_default_is_refused_and_crdgen_catches_it_too(
    k8s136: CRDServer, k8s136_http: requests.Session
) -> None:
    """Regression for issue #14: `default: {}` under the checkpoint-cadence rule. The server refuses
    the CRD naming that default and the rule's message; crdgen's generation-time check reports the
    same default, so the generator can no longer emit it."""
    crd = load_crd(REPO / "crds" / "finetunejobs.kubetune.io.yaml")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    checkpoint = schema["properties"]["spec"]["properties"]["training"]["properties"]["checkpoint"]
    assert checkpoint["default"] != {}
    checkpoint["default"] = {}
    response = k8s136_http.post(k8s136.url(CRD_API), params={"dryRun": "All"}, json=crd, timeout=60)
    text = error_text(response)
    assert response.status_code == 422, text
    assert "properties[checkpoint].default" in text, text
    assert "set checkpoint.everySteps or checkpoint.everyMinutes" in text, text
    problems = crdgen.check_defaults(schema)
    assert any(
        p.startswith("default of spec.training.checkpoint:") and "set checkpoint.everySteps" in p
        for p in problems
    ), problems


# ---------------------------------------------------------------------------------------- CEL cost
def _rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, int, str]]:
    """(schema path, index, rule) of every x-kubernetes-validations entry, in document order."""
    out = [(path or "<root>", i, v["rule"]) for i, v in enumerate(schema.get("x-kubernetes-validations", []))]
    for key, sub in schema.get("properties", {}).items():
        out += _rules(sub, f"{path}.{key}".lstrip("."))
    if isinstance(schema.get("additionalProperties"), dict):
        out += _rules(schema["additionalProperties"], f"{path}.*")
    if isinstance(schema.get("items"), dict):
        out += _rules(schema["items"], f"{path}.[]")
    return out


def _keep_rules(schema: dict[str, Any], keep: set[tuple[str, int]] | None, path: str = "") -> None:
    """Drop every rule not in ``keep`` (None keeps all), in place."""
    rules = schema.get("x-kubernetes-validations")
    if rules is not None and keep is not None:
        kept = [r for i, r in enumerate(rules) if ((path or "<root>"), i) in keep]
        if kept:
            schema["x-kubernetes-validations"] = kept
        else:
            del schema["x-kubernetes-validations"]
    for key, sub in schema.get("properties", {}).items():
        _keep_rules(sub, keep, f"{path}.{key}".lstrip("."))
    if isinstance(schema.get("additionalProperties"), dict):
        _keep_rules(schema["additionalProperties"], keep, f"{path}.*")
    if isinstance(schema.get("items"), dict):
        _keep_rules(schema["items"], keep, f"{path}.[]")


def _probe(
    http: requests.Session,
    server: CRDServer,
    crd: dict[str, Any],
    keep: set[tuple[str, int]] | None,
    copies: int,
) -> tuple[float | None, float | None]:
    """Dry-run-create a probe CRD whose schema holds ``copies`` copies of the real one (a map with
    ``maxProperties: copies``: the server multiplies every rule's estimated cost by it, and a map
    keeps ``oldSelf`` rules correlatable), keeping only the rules in ``keep``.

    Returns (per-rule exceed factor, total exceed factor): None when under the limit,
    ``inf`` for the server's "more than 100x".
    """
    real = copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    _keep_rules(real, keep)
    for key in ("apiVersion", "kind", "metadata"):
        real["properties"].pop(key, None)
    probe: dict[str, Any] = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "costprobes.probe.kubetune.io"},
        "spec": {
            "group": "probe.kubetune.io",
            "scope": "Namespaced",
            "names": {"kind": "CostProbe", "plural": "costprobes", "singular": "costprobe"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "p": {"type": "object", "maxProperties": copies, "additionalProperties": real}
                            },
                        }
                    },
                }
            ],
        },
    }
    response = http.post(server.url(CRD_API), params={"dryRun": "All"}, json=probe, timeout=60)
    if response.status_code == 201:
        return None, None
    text = error_text(response)
    assert response.status_code == 422, text

    def factor(match: re.Match[str] | None) -> float | None:
        if match is None:
            return None
        return math.inf if match.group(1) == "more than 100x" else float(match.group(1).rstrip("x"))

    rule_factor = None
    for line in text.splitlines():
        _, _, message = line.partition(": ")
        rule_factor = rule_factor or factor(_RULE_COST.search(message))
    total_factor = factor(_TOTAL_COST.search(text))
    if rule_factor is None and total_factor is None:
        raise AssertionError(f"probe refused for another reason than cost:\n{text}")
    return rule_factor, total_factor


def _measure(
    http: requests.Session,
    server: CRDServer,
    crd: dict[str, Any],
    keep: set[tuple[str, int]] | None,
    limit: int,
    pick: int,
) -> int:
    """The server's estimated cost (one rule, or the total) from its exceed factors.

    With ``k`` copies the server reports ``cost * k / limit`` — with 6 decimals below 1.5x, 1
    decimal up to 100x, nothing above. So: find a ``k`` that lands inside 100x, then one that lands
    near 1.2x, and read the cost back from that factor (exact to well under 1 for costs below 10^5).
    """
    copies = 10**7
    estimate: float | None = None
    for _ in range(20):
        found = _probe(http, server, crd, keep, copies)[pick]
        if found is None:  # under the limit even with this many copies
            copies *= 100
            assert copies < 10**16, "cost 0?"
            continue
        if math.isinf(found):
            assert copies > 1, "the rule alone exceeds the limit more than 100 times"
            copies = max(1, copies // 100)
            continue
        estimate = found * limit / copies
        if found < 1.5:
            return round(estimate)
        break
    assert estimate is not None, "no cost factor found"
    copies = max(1, math.ceil(1.2 * limit / estimate))
    found = _probe(http, server, crd, keep, copies)[pick]
    if found is not None and not math.isinf(found) and found < 1.5:
        return round(found * limit / copies)
    return round(estimate)


def _measure_rule_cost(
    http: requests.Session, server: CRDServer, crd: dict[str, Any], rule: tuple[str, int]
) -> int:
    """The server's estimated cost of one rule at its place in the CRD (cardinality included)."""
    return _measure(http, server, crd, {rule}, RULE_COST_LIMIT, pick=0)


def test_every_cel_rule_compiles_and_its_estimated_cost_is_reported_within_limits(
    crd_installs: dict[str, dict[str, Any]],
    k8s136: CRDServer,
    k8s136_http: requests.Session,
    capsys: pytest.CaptureFixture[str],
    record_property: Any,
) -> None:
    """Each rule's cost as the 1.36 server estimates it, and the CRD's total, against the limits.

    The installs above prove the server compiled every rule and found each cost and the total within
    the limits (it refuses the CRD otherwise, naming the rule). The figures are the server's own
    estimates, read back from the cost errors it gives for dry-run probe CRDs (see _probe/_measure):
    not computed by this test.
    """
    lines = [
        f"CEL cost as estimated by apiextensions-apiserver v1.36.4 (per-rule limit {RULE_COST_LIMIT:,}, "
        f"per-CRD limit {CRD_COST_LIMIT:,})"
    ]
    failures = []
    for file in CRD_FILES:
        crd = load_crd(REPO / "crds" / file)
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        rules = _rules(schema)
        assert rules, file
        costs = {}
        for path, index, rule in rules:
            cost = _measure_rule_cost(k8s136_http, k8s136, crd, (path, index))
            costs[(path, index)] = cost
            lines.append(f"  {file}  {path}[{index}]  cost {cost:>10,}  {rule[:70]}")
            record_property(f"cel_cost:{file}:{path}[{index}]", cost)
            if cost > RULE_COST_LIMIT:
                failures.append(f"{file} {path}[{index}] costs {cost:,} > {RULE_COST_LIMIT:,}: {rule}")
        total = _measure(k8s136_http, k8s136, crd, None, CRD_COST_LIMIT, pick=1)
        summed = sum(costs.values())
        lines.append(
            f"  {file}  {len(rules)} rules: total {total:,} as the server adds them up "
            f"(sum of the above {summed:,}) = {100 * total / CRD_COST_LIMIT:.4f}% of {CRD_COST_LIMIT:,}"
        )
        record_property(f"cel_cost_total:{file}", total)
        # The server's total is the sum of its per-rule estimates; allow rounding of the factors.
        assert abs(total - summed) <= max(2, summed // 10**5), (file, total, summed)
        if total > CRD_COST_LIMIT:
            failures.append(f"{file}: total {total:,} > {CRD_COST_LIMIT:,}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not failures, "\n".join(failures)
    for record in crd_installs.values():
        assert record["status"] == 201, record["error"]


def test_a_rule_that_does_not_compile_is_refused_naming_it(
    k8s136: CRDServer, k8s136_http: requests.Session
) -> None:
    """Control: the server really compiles the rules (v1.20 stored anything in x-kubernetes-validations)."""
    crd = load_crd(REPO / "crds" / "finetunejobs.kubetune.io.yaml")
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["x-kubernetes-validations"].append({"rule": "self.noSuchField > 0", "message": "broken"})
    index = len(spec["x-kubernetes-validations"]) - 1
    response = k8s136_http.post(k8s136.url(CRD_API), params={"dryRun": "All"}, json=crd, timeout=60)
    text = error_text(response)
    assert response.status_code == 422, text
    assert f"properties[spec].x-kubernetes-validations[{index}].rule" in text, text
    assert "noSuchField" in text, text


# ------------------------------------------------------------------------------- custom resources
@pytest.mark.parametrize(
    ("path", "index", "doc"),
    example_documents(),
    ids=lambda v: str(v.relative_to(REPO)) if isinstance(v, Path) else None,
)
def test_example_is_accepted_strictly_and_defaulted_like_pydantic(
    installed: None,
    k8s136: CRDServer,
    k8s136_http: requests.Session,
    path: Path,
    index: int,
    doc: dict[str, Any],
) -> None:
    ns = doc["metadata"].get("namespace") or fresh_namespace()
    kind = doc["kind"]
    response = k8s136_http.post(
        k8s136.url(resource_path(kind, ns)), params={"fieldValidation": "Strict"}, json=doc, timeout=60
    )
    assert response.status_code == 201, (
        f"{path}[{index}]: HTTP {response.status_code}\n{error_text(response)}"
    )
    assert warnings_of(response) == [], warnings_of(response)
    stored = k8s136_http.get(k8s136.url(resource_path(kind, ns, doc["metadata"]["name"])), timeout=30).json()
    models: dict[str, type[FineTuneJob | ModelVersion | FineTuneSweep]] = {
        "FineTuneJob": FineTuneJob,
        "ModelVersion": ModelVersion,
        "FineTuneSweep": FineTuneSweep,
    }
    model = models[kind].model_validate(doc)
    # One source of truth: the spec the server stores (its structural defaults applied) is exactly the
    # spec pydantic resolves from the same document.
    expected = model.spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    assert stored["spec"] == expected, _diff(stored["spec"], expected)


def _diff(got: Any, want: Any, path: str = "spec") -> str:
    """The paths where the server's object and pydantic's differ (for the assertion message)."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = [f"{path}.{k}: server has it, pydantic not ({got[k]!r})" for k in got.keys() - want.keys()]
        out += [f"{path}.{k}: pydantic has it, server not ({want[k]!r})" for k in want.keys() - got.keys()]
        for k in got.keys() & want.keys():
            sub = _diff(got[k], want[k], f"{path}.{k}")
            if sub:
                out.append(sub)
        return "\n".join(out)
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return "\n".join(
            d for i, (a, b) in enumerate(zip(got, want, strict=True)) if (d := _diff(a, b, f"{path}[{i}]"))
        )
    return "" if got == want else f"{path}: server {got!r} != pydantic {want!r}"


CORPUS = load_corpus()


def test_every_corpus_file_is_refused_by_the_server_naming_the_field(
    installed: None, k8s136: CRDServer, k8s136_http: requests.Session
) -> None:
    """All of tests/reliability/corpus, as `kubectl apply` sends it (fieldValidation=Strict): schema
    and CEL cases get 422, unknown-field cases 400, and every refusal names the case's field. The
    CEL-only cases are the ones a v1.20 server stores."""
    ns = fresh_namespace()
    failures = []
    refused_by_layer: dict[str, int] = {}
    for case in CORPUS:
        doc = case.load()
        response = k8s136_http.post(
            k8s136.url(resource_path(doc.get("kind", "FineTuneJob"), ns)),
            params={"fieldValidation": "Strict"},
            json=doc,
            timeout=60,
        )
        text = error_text(response)
        # Under Strict the decoder runs first: a schema case that also carries an unknown field (a
        # mapping where a list is due) is refused with 400 naming that field, before validation (422).
        want = {"pruned": (400,), "schema": (422, 400), "cel": (422,)}[case.layer]
        if response.status_code not in want:
            failures.append(
                f"{case.name} ({case.layer}): HTTP {response.status_code}, wanted {want}: {text[:300]}"
            )
        elif not names_field(text, case.expect):
            failures.append(f"{case.name} ({case.layer}): refused without naming {case.expect}: {text[:300]}")
        else:
            refused_by_layer[case.layer] = refused_by_layer.get(case.layer, 0) + 1
    assert not failures, "\n".join(failures)
    assert sum(refused_by_layer.values()) == len(CORPUS) and refused_by_layer.get("cel", 0) > 0, (
        refused_by_layer
    )
    listed = k8s136_http.get(k8s136.url(resource_path("FineTuneJob", ns)), timeout=30).json()
    assert listed["items"] == []


def test_unknown_fields_are_refused_under_strict_and_pruned_with_a_warning_otherwise(
    installed: None, k8s136: CRDServer, k8s136_http: requests.Session
) -> None:
    cases = [c for c in CORPUS if c.layer == "pruned"]
    assert cases
    ns = fresh_namespace()
    for case in cases:
        doc = case.load()
        url = k8s136.url(resource_path("FineTuneJob", ns))
        strict = k8s136_http.post(url, params={"fieldValidation": "Strict"}, json=doc, timeout=60)
        assert strict.status_code == 400 and names_field(error_text(strict), case.expect), error_text(strict)
        # No fieldValidation parameter: the server's default (Warn) stores the object pruned.
        lenient = k8s136_http.post(url, json=doc, timeout=60)
        assert lenient.status_code == 201, error_text(lenient)
        warned = warnings_of(lenient)
        assert any(case.expect in w and "unknown field" in w for w in warned), (case.name, warned)
        stored = k8s136_http.get(f"{url}/{doc['metadata']['name']}", timeout=30).json()
        node: Any = stored
        *parents, leaf = case.expect.split(".")
        for part in parents:
            node = node[part]
        assert leaf not in node, f"{case.name}: the server kept {case.expect}"
    # An unknown field next to valid ones, and Ignore: stored pruned without a word.
    doc = quickstart_job("ignore-unknown")
    doc["spec"]["training"]["learningRat"] = 0.1
    ignored = k8s136_http.post(
        k8s136.url(resource_path("FineTuneJob", ns)),
        params={"fieldValidation": "Ignore"},
        json=doc,
        timeout=60,
    )
    assert ignored.status_code == 201 and warnings_of(ignored) == [], error_text(ignored)
    assert "learningRat" not in ignored.json()["spec"]["training"]


def test_status_subresource(installed: None, k8s136: CRDServer, k8s136_http: requests.Session) -> None:
    ns, name = fresh_namespace(), "status-subresource"
    created = k8s136_http.post(
        k8s136.url(resource_path("FineTuneJob", ns)),
        params={"fieldValidation": "Strict"},
        json=quickstart_job(name),
        timeout=60,
    )
    assert created.status_code == 201, error_text(created)
    generation = created.json()["metadata"]["generation"]
    merge = {"Content-Type": "application/merge-patch+json"}
    status: dict[str, Any] = {
        "phase": "Running",
        "stage": "Training",
        "reason": "Training",
        "progress": {"summary": "3/10"},
    }
    # Writes to /status change the status only, even when they carry a spec change.
    patched = k8s136_http.patch(
        k8s136.url(resource_path("FineTuneJob", ns, name, "status")),
        params={"fieldValidation": "Strict"},
        json={"status": status, "spec": {"training": {"epochs": 99}}},
        headers=merge,
        timeout=60,
    )
    assert patched.status_code == 200, error_text(patched)
    body = patched.json()
    assert body["status"]["phase"] == "Running" and body["status"]["progress"]["summary"] == "3/10"
    assert body["spec"]["training"]["epochs"] != 99
    assert body["metadata"]["generation"] == generation
    # Writes to the main resource ignore status; a spec change bumps the generation.
    main = k8s136_http.patch(
        k8s136.url(resource_path("FineTuneJob", ns, name)),
        json={"status": {"phase": "Succeeded"}, "spec": {"training": {"epochs": 4}}},
        headers=merge,
        timeout=60,
    )
    assert main.status_code == 200, error_text(main)
    assert main.json()["status"]["phase"] == "Running"
    assert main.json()["metadata"]["generation"] == generation + 1
    # The status is validated against its schema too.
    bad = k8s136_http.patch(
        k8s136.url(resource_path("FineTuneJob", ns, name, "status")),
        json={"status": {"phase": "Exploded"}},
        headers=merge,
        timeout=60,
    )
    assert bad.status_code == 422 and "status.phase" in error_text(bad), error_text(bad)


TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def test_printer_columns(installed: None, k8s136: CRDServer, k8s136_http: requests.Session) -> None:
    ns = fresh_namespace()
    job = quickstart_job("columns")
    assert (
        k8s136_http.post(k8s136.url(resource_path("FineTuneJob", ns)), json=job, timeout=60).status_code
        == 201
    )
    k8s136_http.patch(
        k8s136.url(resource_path("FineTuneJob", ns, "columns", "status")),
        json={"status": {"phase": "Running", "stage": "Training", "progress": {"summary": "3/10"}}},
        headers={"Content-Type": "application/merge-patch+json"},
        timeout=60,
    ).raise_for_status()
    mv = minimal_modelversion("support-assistant-v1")
    assert (
        k8s136_http.post(k8s136.url(resource_path("ModelVersion", ns)), json=mv, timeout=60).status_code
        == 201
    )

    def table(kind: str) -> dict[str, Any]:
        r = k8s136_http.get(k8s136.url(resource_path(kind, ns)), headers={"Accept": TABLE}, timeout=30)
        assert r.status_code == 200 and r.json()["kind"] == "Table", r.text[:300]
        return dict(r.json())

    ftj = table("FineTuneJob")
    columns = [(c["name"], c.get("priority", 0)) for c in ftj["columnDefinitions"]]
    assert columns == [
        ("Name", 0),
        ("Phase", 0),
        ("Stage", 1),
        ("Progress", 0),
        ("Version", 0),
        ("Reason", 1),
        ("Age", 0),
    ]
    assert ftj["rows"][0]["cells"][:4] == ["columns", "Running", "Training", "3/10"]
    mvt = table("ModelVersion")
    assert [c["name"] for c in mvt["columnDefinitions"]] == [
        "Name",
        "Model",
        "Version",
        "Base",
        "Metric",
        "Gates",
        "Age",
    ]
    assert mvt["rows"][0]["cells"][1:5] == [
        "support-assistant",
        "v1",
        "s3://models/base/mistral-7b",
        "eval_loss=1.234",
    ]


def test_modelversion_spec_is_immutable(
    installed: None, k8s136: CRDServer, k8s136_http: requests.Session
) -> None:
    ns, name = fresh_namespace(), "support-assistant-v1"
    url = k8s136.url(resource_path("ModelVersion", ns, name))
    created = k8s136_http.post(
        k8s136.url(resource_path("ModelVersion", ns)),
        params={"fieldValidation": "Strict"},
        json=minimal_modelversion(name),
        timeout=60,
    )
    assert created.status_code == 201, error_text(created)
    merge = {"Content-Type": "application/merge-patch+json"}
    changed = k8s136_http.patch(url, json={"spec": {"keyMetric": "eval_loss=0.1"}}, headers=merge, timeout=60)
    assert changed.status_code == 422, error_text(changed)
    assert "ModelVersion spec is immutable" in error_text(changed)
    labelled = k8s136_http.patch(
        url, json={"metadata": {"labels": {"team": "ml"}}}, headers=merge, timeout=60
    )
    assert labelled.status_code == 200, error_text(labelled)
    assert k8s136_http.get(url, timeout=30).json()["spec"]["keyMetric"] == "eval_loss=1.234"


def test_openapi_v3_describes_every_property(
    installed: None, k8s136: CRDServer, k8s136_http: requests.Session
) -> None:
    """What `kubectl explain` reads: /openapi/v3 lists the group, and every property of both kinds
    (spec and status, all the way down) has a description; defaults and bounds are published."""

    def group_document() -> dict[str, Any] | None:
        index = k8s136_http.get(k8s136.url("/openapi/v3"), timeout=30)
        if index.status_code != 200:
            return None
        entry = index.json().get("paths", {}).get(f"apis/{GROUP}/{VERSION}")
        if not entry:
            return None
        doc = k8s136_http.get(k8s136.url(entry["serverRelativeURL"]), timeout=30)
        schemas = doc.json().get("components", {}).get("schemas", {}) if doc.status_code == 200 else {}
        wanted = {f"io.kubetune.{VERSION}.FineTuneJob", f"io.kubetune.{VERSION}.ModelVersion"}
        return dict(doc.json()) if wanted <= set(schemas) else None

    doc = wait_until(f"apis/{GROUP}/{VERSION} in /openapi/v3", group_document, timeout=60)
    schemas = doc["components"]["schemas"]
    undescribed: list[str] = []

    def visit(node: dict[str, Any], path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if not (sub.get("description") or "").strip():
                undescribed.append(f"{path}.{key}")
            visit(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            visit(node["additionalProperties"], f"{path}{{}}")

    counted = 0
    for kind in ("FineTuneJob", "ModelVersion"):
        root = schemas[f"io.kubetune.{VERSION}.{kind}"]
        assert root.get("description"), kind
        visit(root, kind)
        counted += str(root).count("'description'")
    assert not undescribed, f"{len(undescribed)} properties without a description: {undescribed[:20]}"
    assert counted > 100
    ftj = schemas[f"io.kubetune.{VERSION}.FineTuneJob"]["properties"]["spec"]["properties"]
    r = ftj["method"]["properties"]["lora"]["properties"]["r"]
    assert r["default"] == 16 and "maximum" in r, r
    checkpoint = ftj["training"]["properties"]["checkpoint"]
    assert checkpoint["default"] == {"everySteps": 200, "everyMinutes": 30, "keep": 2}, checkpoint
