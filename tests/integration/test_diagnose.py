"""The routing monitor inside real (tiny) training runs: exact across resume, no effect on training,
`moedit diagnose` writes its report, dense runs and runs without a record fail clearly."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from moedit.cli.main import main as cli_main
from moedit.diagnostics.record import RoutingRecord
from moedit.diagnostics.report import FIGURE_NOTES
from moedit.train import checkpoint as ckpt

from test_train import final_tensors, run_training, tiny_config

torch.set_num_threads(2)

STEPS = 16


def monitored(out_dir, **train) -> dict:
    data = tiny_config(out_dir, steps=STEPS, ckpt_every=8, log_every=4, **train)
    data["diagnostics"] = {"probe_every": 4, "token_samples": 2}
    return data


def test_record_is_exact_across_resume_and_diagnose_reports(tmp_path, capsys):
    straight = tmp_path / "straight"
    run_training(monitored(straight))
    split = tmp_path / "split"
    run_training(monitored(split))
    shutil.rmtree(ckpt.list_checkpoints(split / "checkpoints")[-1])  # back to step 8: records 9-16 are redone
    run_training(monitored(split), resume=True)
    a, b = RoutingRecord(straight), RoutingRecord(split)
    assert list(a.records["step"]) == list(range(1, STEPS + 1))
    assert np.array_equal(a.records, b.records) and np.array_equal(a.tokens, b.tokens)
    assert a.records["probes"].sum() == STEPS // 4 and a.summary is not None

    assert cli_main(["diagnose", str(straight)]) == 0
    out = straight / "diagnostics"
    assert "report:" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for name, _, _ in FIGURE_NOTES:
        assert (out / name).stat().st_size > 5000 and f"({name})" in report
    assert "| layer | block |" in report and "Sampled token decisions" in report


def test_monitor_does_not_change_training(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    run_training(tiny_config(on))
    data = tiny_config(off)
    data["diagnostics"] = {"monitor": False}
    run_training(data)
    assert not (off / "routing").exists() and (on / "routing" / "records.bin").stat().st_size > 0
    a, b = final_tensors(on), final_tensors(off)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dense_run_has_no_record_and_diagnose_says_why(tmp_path, capsys):
    data = tiny_config(tmp_path / "dense", steps=2, ckpt_every=0)
    data["model"]["moe"] = None
    run_training(data)
    assert not (tmp_path / "dense" / "routing").exists()
    assert cli_main(["diagnose", str(tmp_path / "dense")]) == 2
    assert "no routing record" in capsys.readouterr().err
