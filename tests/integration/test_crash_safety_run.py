"""What a kill -9 can leave in a real (tiny) run directory never stops `train --resume` or `moedit diagnose`:
a torn last line of metrics.jsonl or routing/events.jsonl, an empty routing/header.json (an older moedit
wrote it in place), a damaged summary.json. The resumed record matches an uninterrupted run's exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from moedit.cli.main import main as cli_main
from moedit.diagnostics.record import RoutingRecord
from moedit.train import checkpoint as ckpt
from moedit.train.metrics import read_metrics

from test_diagnose import monitored
from test_train import run_training

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("crash_safety") / "straight"
    run_training(monitored(run))
    return run


def killed_copy(straight, tmp_path):
    """The finished run as if killed after its step-8 checkpoint: resuming redoes steps 9-16."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(ckpt.list_checkpoints(run / "checkpoints")[-1])
    return run


def test_torn_last_lines_resume_exactly_and_diagnose(straight, tmp_path, capsys):
    run = killed_copy(straight, tmp_path)
    for name, torn in (("metrics.jsonl", '{"step": 17, "lo'), ("routing/events.jsonl", '{"step": 17, "ki')):
        with open(run / name, "a") as f:
            f.write(torn)
    run_training(monitored(run), resume=True)
    a, b = RoutingRecord(straight), RoutingRecord(run)
    assert np.array_equal(a.records, b.records) and np.array_equal(a.tokens, b.tokens) and a.events == b.events
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [4, 8, 12, 16]
    assert all(line.endswith("\n") for line in open(run / "metrics.jsonl"))
    assert cli_main(["diagnose", str(run)]) == 0
    assert "report:" in capsys.readouterr().out and (run / "diagnostics" / "report.md").is_file()


def test_empty_header_diagnose_says_how_and_resume_rebuilds_it(straight, tmp_path, capsys):
    run = killed_copy(straight, tmp_path)
    (run / "routing" / "header.json").write_text("")
    assert cli_main(["diagnose", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "header.json is damaged" in err and "--resume" in err
    run_training(monitored(run), resume=True)
    assert "rebuilt it" in capsys.readouterr().out
    assert not (run / "routing.before_step_8").exists()
    a, b = RoutingRecord(straight), RoutingRecord(run)
    assert a.header == b.header and np.array_equal(a.records, b.records) and np.array_equal(a.tokens, b.tokens)
    assert cli_main(["diagnose", str(run)]) == 0


def test_damaged_summaries_do_not_stop_diagnose(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "summary.json").write_text('{"steps": 1')  # the run's, written by `moedit train`
    (run / "routing" / "summary.json").write_text("")
    assert cli_main(["diagnose", str(run)]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "summary.json is damaged" in captured.err
    report = (run / "diagnostics" / "report.md").read_text()
    assert "summary.json is damaged" in report and "| layer | block |" in report
    json.loads((straight / "routing" / "summary.json").read_text())  # the copy's source was whole
