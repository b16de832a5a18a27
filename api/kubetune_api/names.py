"""Name rules shared by the API, the registry and the operator.

Model, version and alias names become object-store key segments
(``<output>/<model>/versions/<version>/``) and Kubernetes label values, so they are constrained
to a vocabulary that can never escape its prefix: lowercase ASCII letters and digits, single
``.``, ``_`` or ``-`` separators between them (so no ``..``, no leading or trailing separator),
no ``/``, no whitespace, no unicode look-alikes. The patterns are RE2-compatible because the
CRD schema uses them too.
"""

from __future__ import annotations

import re

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

#: A sweep's child FineTuneJobs (docs/sweeps.md): the label every trial and the winner carry (the
#: sweep's name, shortened with a hash when longer than a label value), the exact sweep name, the
#: trial a child runs (JSON: sweep, number, objective metric) and the winner's lineage (JSON: every
#: trial with its values and objective). resolve_run_config turns the last two into RunConfig.trial
#: and RunConfig.sweep.
LABEL_SWEEP = f"{API_GROUP}/sweep"
ANNOTATION_SWEEP = f"{API_GROUP}/sweep-name"
ANNOTATION_SWEEP_TRIAL = f"{API_GROUP}/sweep-trial"
ANNOTATION_SWEEP_LINEAGE = f"{API_GROUP}/sweep-lineage"

#: Model and alias names: ``qwen2.5-7b-support``, ``production``.
NAME_PATTERN = r"^[a-z0-9]+([._-][a-z0-9]+)*$"
NAME_MAX_LENGTH = 63
#: Published version names are allocated by the registry: ``v1``, ``v2``, ...
VERSION_PATTERN = r"^v[1-9][0-9]*$"
#: Base-model and data URIs. ``hf://org/name@revision`` pins a Hub revision.
SOURCE_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file:///.*|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?|modelversion://[a-z0-9]+([._-][a-z0-9]+)*/[a-z0-9]+([._-][a-z0-9]+)*)$"
#: Data URIs: object storage or a local path only.
DATA_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+|file:///.+)$"
#: Where versions are published.
OUTPUT_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file:///.+)$"
#: Kubernetes resource quantities (``500m``, ``64Gi``, ``8``).
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
#: A DNS-1123 label (namespaces).
DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: A DNS-1123 subdomain (object names, Secret names, PriorityClass names, queue names).
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(VERSION_PATTERN)


_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_QUANTITY_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: str) -> float:
    """A Kubernetes resource quantity (``64Gi``, ``24G``, ``500m``, ``1e9``) as a number.

    Raises ValueError for text that is not a quantity. Written here rather than imported from the
    kubernetes client: ``kubetune_api`` is imported by the trainer, which does not install it."""
    match = _QUANTITY_RE.match(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 80Gi, 24G)")
    number, suffix = match.groups()
    if suffix in _QUANTITY_SUFFIXES:
        return float(number) * _QUANTITY_SUFFIXES[suffix]
    if suffix[:1] in "eE" and suffix[1:].lstrip("+-").isdigit():
        return float(number + suffix)
    raise ValueError(f"{value!r} is not a Kubernetes quantity (unknown suffix {suffix!r})")


def is_valid_name(value: str) -> bool:
    """True when ``value`` is a safe model or alias name (pattern and length)."""
    return len(value) <= NAME_MAX_LENGTH and _NAME_RE.fullmatch(value) is not None


def is_valid_version(value: str) -> bool:
    """True when ``value`` is a version name such as ``v12``."""
    return _VERSION_RE.fullmatch(value) is not None


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` when it is a safe model/alias name; raise ValueError saying why not."""
    if not is_valid_name(value):
        raise ValueError(
            f"{what} {value!r} is not allowed: use 1-{NAME_MAX_LENGTH} lowercase letters and digits "
            "separated by single '.', '_' or '-' (no '/', no '..', no leading or trailing separator)"
        )
    return value
