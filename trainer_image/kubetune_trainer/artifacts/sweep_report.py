"""A sweep winner's leaderboard: ``sweep/trials.json``, ``sweep/objective.png`` and the model card's
"Sweep" section (docs/adr/0001). Pure apart from the two files it writes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubetune_trainer.artifacts.report import _table


def sweep_section(lineage: Mapping[str, Any]) -> str:
    """Markdown: what was searched, every trial (parameters, state, objective), the plot."""
    objective = lineage["objective"]
    trials = list(lineage["trials"])
    paths = [p["path"] for p in lineage["parameters"]]
    done = sum(t["state"] == "complete" for t in trials)
    pruned = sum(t["state"] == "pruned" for t in trials)
    failed = sum(t["state"] == "failed" for t in trials)
    rows = []
    for t in sorted(trials, key=lambda t: t["number"]):
        last = max(t.get("intermediate") or {}, key=int, default=None)
        rows.append(
            [
                f"**{t['number']}** (this version)" if t["number"] == lineage["winner"] else t["number"],
                t["state"],
                t.get("value"),
                None if last is None else f"{t['intermediate'][last]:.4g} @ step {last}",
                *[(t.get("params") or {}).get(p) for p in paths],
            ]
        )
    sampler, pruning = lineage["sampler"], lineage["pruning"]
    return "\n".join(
        [
            "## Sweep",
            "",
            f"This version is trial {lineage['winner']} of sweep `{lineage['name']}` (digest "
            f"`{lineage['digest']}`): the best {objective['metric']} ({objective['direction']}) of "
            f"{len(trials)} trials ({done} complete, {pruned} pruned, {failed} failed; budget "
            f"{lineage['maxTrials']}). Sampler {sampler['type']} (seed {sampler['seed']}), pruning "
            f"{pruning['type']}. Only this trial was published; every trial is in `sweep/trials.json`.",
            "",
            _table(["trial", "state", objective["metric"], "last eval_loss", *paths], rows),
            "",
            "![objective by trial](sweep/objective.png)",
            "",
        ]
    )


def write_sweep_report(staging: Path, lineage: Mapping[str, Any]) -> str:
    """``sweep/trials.json`` and ``sweep/objective.png`` in the version; returns the card section."""
    import matplotlib  # deferred: 2 s to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = staging / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    trials = sorted(lineage["trials"], key=lambda t: t["number"])
    metric = lineage["objective"]["metric"]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    complete = [t for t in trials if t["state"] == "complete" and t.get("value") is not None]
    ax.plot(
        [t["number"] for t in complete], [t["value"] for t in complete], "o", label=f"complete ({metric})"
    )
    pruned = [t for t in trials if t["state"] == "pruned" and t.get("intermediate")]
    if pruned:
        last = [t["intermediate"][max(t["intermediate"], key=int)] for t in pruned]
        ax.plot([t["number"] for t in pruned], last, "x", label="pruned (last eval_loss)")
    best = [t for t in complete if t["number"] == lineage["winner"]]
    if best:
        ax.plot([best[0]["number"]], [best[0]["value"]], "*", markersize=14, label="published")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"sweep {lineage['name']}: {metric} by trial")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "objective.png", format="png")
    plt.close(fig)
    return sweep_section(lineage)
