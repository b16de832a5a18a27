"""``kubetune logs --rank N`` picks the pod by completion index, the newest of a retried rank (issue 16)."""

from __future__ import annotations

import datetime
from typing import Any

from kubetune_cli.cluster import pod_for_rank, trainer_pods


def pod(name: str, index: str | None, minute: int) -> dict[str, Any]:
    annotations = {} if index is None else {"batch.kubernetes.io/job-completion-index": index}
    created = datetime.datetime(2026, 11, 22, 10, minute, tzinfo=datetime.UTC)
    return {"metadata": {"name": name, "annotations": annotations, "creation_timestamp": created}}


def test_rank_is_the_completion_index_not_the_list_position() -> None:
    # Rank 0 failed once and was retried: three pods, and pods[1] is NOT rank 1.
    pods = [pod("j-0-aaaaa", "0", 1), pod("j-0-bbbbb", "0", 5), pod("j-1-ccccc", "1", 1)]
    assert pod_for_rank(pods, 1)["metadata"]["name"] == "j-1-ccccc"
    # The retried rank: the newest pod is the current one.
    assert pod_for_rank(pods, 0)["metadata"]["name"] == "j-0-bbbbb"
    assert pod_for_rank(pods, 2) is None


def test_a_v1_20_pod_without_an_index_is_rank_0() -> None:
    assert pod_for_rank([pod("j-x", None, 1)], 0)["metadata"]["name"] == "j-x"
    assert callable(trainer_pods)
