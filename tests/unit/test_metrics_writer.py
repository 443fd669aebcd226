"""RUN/metrics.jsonl across a resume: rows after the resumed step are dropped before appending."""

from __future__ import annotations

import json

from moedit.train.metrics import MetricsWriter, read_metrics


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (2, 4, 6)]
    path.write_text("\n".join(rows) + '\n{"step": 8, "lo')  # a crash cut the last line short
    writer = MetricsWriter(tmp_path, start_step=4)
    writer.write(6, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [2, 4, 6]
    assert read_metrics(path)[-1]["loss"] == 0.5


def test_fresh_run_starts_an_empty_file_and_disabled_writer_touches_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 2}) + "\n")
    MetricsWriter(tmp_path, enabled=False, start_step=0)
    assert path.read_text() == json.dumps({"step": 2}) + "\n"  # other ranks never rewrite it
    MetricsWriter(tmp_path, start_step=0)
    assert read_metrics(path) == []
