"""Guard rails end to end on the real API server (issue 16, deliverable 5).

The bypasses of the issue, applied as a tenant would, against an operator configured with allowed
prefixes ``s3://models`` and ``s3://models/registry``: each FineTuneJob is ``Invalid`` naming the field,
gets a Warning ``InvalidSpec`` Event and no Job. The full matrix (every rule, the safe defaults) is in
tests/unit/test_operator_guard_rails.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.fixtures.operator import Api, OperatorProcess, finetunejob, wait_for
from tests.integration.test_operator_cluster import STUB_COMMAND

pytestmark = pytest.mark.integration

OK: dict[str, Any] = {"output": {"uri": "s3://models/registry"}}


def ftj(name: str, **spec: Any) -> dict[str, Any]:
    body = finetunejob(name, "tiny")
    body["spec"].update({**OK, **spec})
    return body


BYPASSES: dict[str, tuple[dict[str, Any], str]] = {
    "bucket": (
        {"model": {"name": "tiny", "base": {"uri": "s3://models-attacker/base/x"}}},
        "spec.model.base.uri",
    ),
    "segment": ({"output": {"uri": "s3://models/registry-evil"}}, "spec.output.uri"),
    "data": ({"data": {"train": {"uri": "s3://attacker/train.jsonl"}}}, "spec.data.train.uri"),
    "endpoint": ({"storage": {"endpoint": "https://attacker.example.com"}}, "spec.storage.endpoint"),
    "secret": ({"storage": {"credentialsSecret": "someone-elses"}}, "spec.storage.credentialsSecret"),
    "priority": (
        {"resources": {"priorityClassName": "system-cluster-critical"}},
        "spec.resources.priorityClassName",
    ),
    "tolerate-all": (
        {"resources": {"tolerations": [{"operator": "Exists"}]}},
        "spec.resources.tolerations[0]",
    ),
    "gpu-memory": ({"resources": {"gpuResourceName": "memory"}}, "spec.resources.gpuResourceName"),
}


def test_each_bypass_is_invalid_with_the_field_named_an_event_and_no_job(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(
        STUB_COMMAND,
        KUBETUNE_OPERATOR_ALLOWED_BASE_MODEL_PREFIXES="s3://models",
        KUBETUNE_OPERATOR_ALLOWED_OUTPUT_PREFIXES="s3://models/registry",
        KUBETUNE_OPERATOR_ALLOWED_DATA_PREFIXES="s3://data",
        KUBETUNE_OPERATOR_ALLOWED_STORAGE_ENDPOINTS="https://s3.internal.example.com",
        KUBETUNE_OPERATOR_ALLOWED_CREDENTIALS_SECRETS="s3-*",
    )
    for name, (spec, _) in BYPASSES.items():
        api.create_ftj(ftj(name, **spec))
    api.create_ftj(ftj("allowed"))
    for name, (_, field) in BYPASSES.items():
        wait_for(
            f"{name}: Invalid=True",
            lambda n=name: (api.condition(n, "Invalid") or {}).get("status") == "True",
            60,
            op.log,
        )
        cond = api.condition(name, "Invalid")
        assert cond is not None and field in cond["message"], (name, cond)
        assert cond["observedGeneration"] == 1
        events = wait_for(
            f"{name}: InvalidSpec event",
            lambda n=name: [e for e in api.events(n) if e.reason == "InvalidSpec" and e.type == "Warning"],
        )
        assert field in events[0].message
    # The one within the rules runs; none of the others got a Job.
    wait_for("allowed Succeeded", lambda: api.status("allowed").get("phase") == "Succeeded", 90, op.log)
    for name in BYPASSES:
        assert api.jobs(name) == [], name
