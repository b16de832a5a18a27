"""Deterministic names and labels of a FineTuneJob's children.

Handlers are at-least-once, so every child has a name computed from the FineTuneJob alone: a
retried or restarted reconcile creates the same name again and gets 409 instead of a duplicate.

Limits that shape the names: a FineTuneJob name may be a 253-character DNS subdomain with dots,
but an Indexed Job's pods get the hostname ``<job-name>-<index>`` (a 63-character DNS label), a
Service name is a DNS-1035 label, and label values stop at 63 characters. Names that would not
fit are shortened and given a hash of the full name, so two long names never collide.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from kubetune_api import names

#: Labels every child carries.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune-operator"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_FINETUNEJOB = "kubetune.io/finetunejob"
LABEL_ATTEMPT = "kubetune.io/attempt"
LABEL_MODEL = "kubetune.io/model"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
#: Annotations: the exact FineTuneJob name (labels may be shortened) and the spec fingerprint.
ANNOTATION_FINETUNEJOB = "kubetune.io/finetunejob-name"
ANNOTATION_FINGERPRINT = "kubetune.io/spec-fingerprint"
ANNOTATION_GENERATION = "kubetune.io/generation"

#: Room left in a Job name for the ``-<index>-<random5>`` suffix of its pods' names/hostnames.
JOB_NAME_MAX = 52
LABEL_MAX = 63

_NOT_LABEL_CHARS = re.compile(r"[^a-z0-9-]+")


def _short_hash(text: str, length: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dns_label(base: str, suffix: str = "", max_length: int = LABEL_MAX) -> str:
    """A DNS-1035 label (``[a-z]([-a-z0-9]*[a-z0-9])?``) made of ``base`` and ``suffix``.

    Characters a label may not hold become ``-``; a leading digit gets an ``x`` prefix; when the
    result would be longer than ``max_length`` or had to be changed, a hash of ``base`` keeps it
    unique. Same input, same output.
    """
    clean = _NOT_LABEL_CHARS.sub("-", base.lower()).strip("-") or "x"
    if not clean[0].isalpha():
        clean = "x" + clean
    tail = f"-{suffix}" if suffix else ""
    changed = clean != base
    if changed or len(clean) + len(tail) > max_length:
        room = max_length - len(tail) - 7
        clean = clean[:room].rstrip("-") + "-" + _short_hash(base)
    return clean + tail


def label_value(value: str) -> str:
    """``value`` as a label value (<= 63 chars); shortened with a hash when longer."""
    if len(value) <= LABEL_MAX:
        return value
    return value[: LABEL_MAX - 7].rstrip("-._") + "-" + _short_hash(value)


def spec_fingerprint(spec: dict[str, Any]) -> str:
    """8 hex digits identifying what an attempt trains; ``runPolicy.suspend`` is left out.

    Suspending and resuming is applied to the running attempt in place, every other spec change
    starts a new attempt (see docs/operator.md, "Spec changes").
    """
    material = json.loads(json.dumps(spec))
    material.get("runPolicy", {}).pop("suspend", None)
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def job_name(ftj_name: str, generation: int) -> str:
    """The batch/v1 Job of the attempt started by spec generation ``generation``: ``<name>-g<N>``.

    Named after the generation, not the spec's content: what the API server shows of a stored spec
    changes when a CRD upgrade adds a defaulted field, its generation does not (docs/operating.md,
    "Upgrades"). Releases before 0.2 named Jobs ``<name>-<fingerprint>``; those are adopted as they are
    (the current attempt is the one in ``status.jobName``).
    """
    return dns_label(ftj_name, f"g{generation}", JOB_NAME_MAX)


def config_map_name(attempt: str) -> str:
    """The ConfigMap holding the RunConfig of one attempt (one per attempt, immutable)."""
    return f"{attempt}-run-config"


def service_name(ftj_name: str) -> str:
    """The headless rendezvous Service (one per FineTuneJob; a DNS-1035 label)."""
    return dns_label(ftj_name, "rdzv")


def trainer_account_name(ftj_name: str) -> str:
    """ServiceAccount, Role and RoleBinding of the trainer pods (one set per FineTuneJob)."""
    return dns_label(ftj_name, "trainer", 253)


def model_version_name(model: str, version: str, uri: str | None = None) -> str:
    """``<model>-<version>`` (e.g. ``tiny-demo-v1``) as an object name.

    Model names may hold ``_``, which object names may not: such names are mapped to ``-`` and
    get a hash of the real model name, so ``a_b`` and ``a-b`` never share a record. With ``uri`` (the
    version's folder) the name also gets a hash of it: the record of a version of the same model
    and version name published to another registry (another ``spec.output.uri``), which must not
    collide with the first one's ``<model>-<version>``.
    """
    names.check_name(model, "model name")
    wanted = f"{model}-{version}"
    if "_" in wanted:
        wanted = f"{wanted.replace('_', '-')}-{_short_hash(model)}"
    if uri is not None:
        wanted = f"{wanted}-{_short_hash(uri)}"
    return wanted
