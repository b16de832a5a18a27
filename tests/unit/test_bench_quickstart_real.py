"""bench.quickstart_real: the stage breakdown read from the trainer's stamped lines."""

from __future__ import annotations

from bench.quickstart_real import stage_breakdown


def test_stage_spans_follow_the_stage_lines() -> None:
    lines = [
        (1.0, "[kubetune] running FineTuneJob 'q'"),
        (2.0, "[kubetune] stage Fetching: base s3://b/m.gguf"),
        (40.0, "[kubetune] stage PreparingData"),
        (41.0, "[kubetune] stage PreparingData"),
        (45.0, "[kubetune] stage Training"),
        (600.0, "[kubetune] stage Evaluating"),
        (900.0, "[kubetune] stage Quantizing: merging the adapter into the base"),
        (920.0, "[kubetune] stage Quantizing: int8"),
        (950.0, "[kubetune] stage Publishing"),
        (955.0, "[kubetune] stage End"),
    ]
    assert stage_breakdown(lines) == [
        {"stage": "Start-up", "seconds": 2.0},
        {"stage": "Fetching", "seconds": 38.0},
        {"stage": "PreparingData", "seconds": 5.0},
        {"stage": "Training", "seconds": 555.0},
        {"stage": "Evaluating", "seconds": 300.0},
        {"stage": "Merging", "seconds": 20.0},
        {"stage": "Quantizing", "seconds": 30.0},
        {"stage": "Publishing", "seconds": 5.0},
    ]
