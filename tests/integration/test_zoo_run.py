"""`moedit zoo` end to end on a micro MNIST zoo: every run trains, is evaluated at each curve checkpoint
and tabulated; a zoo interrupted after training continues without training again; a finished zoo
called again redoes nothing; the CLI refuses other settings for the same folder."""

from __future__ import annotations

import json

import pytest
import yaml

from moedit.cli.main import main as cli_main
from moedit.data import DatasetError, load_mnist
from moedit.zoo import ZooSettings, run_zoo, write_report
from moedit.zoo import runner as zoo_runner

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SETTINGS = ZooSettings(steps=4, curve_points=2, eval_n=10, sampler_steps=1, cfg_scale=1.0, threads=1)


class Interrupt(Exception):
    pass


@pytest.fixture
def zoo_file(tmp_path, monkeypatch):
    try:
        load_mnist("test")
    except DatasetError as exc:
        pytest.skip(f"MNIST is not installed: {exc}")
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))
    base = {
        "model": {"preset": "micro", "moe": {"num_experts": 4, "expert_ratio": 1.0, "router": {"top_k": 2}}},
        "train": {"batch_size": 8, "warmup_steps": 1, "log_every": 2},
        "diagnostics": {"probe_every": 2, "token_samples": 4},
        "sample": {"per_class": 1},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    zoo = {"entries": {"dense": {"config": "base.yaml", "set": ["model.moe=null", "model.mlp_ratio=2"]},
                       "topk": "base.yaml",
                       "race": {"config": "base.yaml", "set": ["model.moe.router.name=race"]}}}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo, sort_keys=False))
    return tmp_path / "zoo.yaml"


def test_zoo_trains_evaluates_tabulates_and_resumes(zoo_file, tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    real_curve = zoo_runner.evaluate_curve

    def interrupted(run, settings, progress):
        if run.entry.name == "race":
            raise Interrupt
        return real_curve(run, settings, progress)

    monkeypatch.setattr(zoo_runner, "evaluate_curve", interrupted)
    with pytest.raises(Interrupt):  # stops after race trained, before it was evaluated
        run_zoo(zoo_file, root, SETTINGS, seeds=[0], progress=False, log=lambda m: None)
    race_dir = root / "mnist" / "race" / "seed0"
    assert (race_dir / "checkpoints" / "step_00000004").is_dir() and not (race_dir / "result.json").exists()
    monkeypatch.setattr(zoo_runner, "evaluate_curve", real_curve)

    rows = run_zoo(zoo_file, root, SETTINGS, seeds=[0], progress=False, log=lambda m: None)
    assert [r["entry"] for r in rows] == ["dense", "topk", "race"]
    assert len(json.loads((race_dir / "zoo_train.json").read_text())) == 1  # not trained again
    for r in rows:
        assert [p["step"] for p in r["curve"]] == [2, 4] and r["final"] == r["curve"][-1]
        assert r["train_wall_s"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["final"]["accuracy"] <= 1 and r["final"]["fd_lenet"] > 0
    dense, topk, race = rows
    assert dense["routing"] == {} and dense["params_router"] == 0
    assert topk["routing"]["experts_per_token"] == pytest.approx(2.0)
    by_t = [v for v in topk["routing"]["experts_per_token_T"] if v == v]  # buckets no token fell in are NaN
    assert len(topk["routing"]["experts_per_token_T"]) == 4 and by_t and all(v == pytest.approx(2.0) for v in by_t)
    assert 0 <= topk["routing"]["top1_share"] <= 1 and topk["routing"]["pairs_95"] is not None
    assert race["routing"]["homogenisation"] is not None
    md = (root / "results.md").read_text()
    assert "### mnist" in md and "| race | 1 |" in md and "MaxVio" in md
    assert (root / "quality_vs_steps.png").stat().st_size > 0

    # the report recomputes routing metrics from the records when asked: the same numbers for these runs
    before = json.dumps(json.loads((race_dir / "result.json").read_text())["routing"])
    write_report(root, refresh_routing=True)
    assert json.dumps(json.loads((race_dir / "result.json").read_text())["routing"]) == before
    stamps = {p: p.stat().st_mtime for p in root.glob("mnist/*/seed0/result.json")}
    run_zoo(zoo_file, root, SETTINGS, seeds=[0], progress=False, log=lambda m: None)  # all done: nothing redone
    assert stamps == {p: p.stat().st_mtime for p in root.glob("mnist/*/seed0/result.json")}


def test_cli_refuses_other_settings_for_a_zoo_folder(zoo_file, tmp_path, capsys):
    root = tmp_path / "zoo"
    args = ["zoo", "--zoo", str(zoo_file), "--out", str(root), "--entries", "dense", "--seeds", "0",
            "--steps", "4", "--curve-points", "1", "--eval-n", "10", "--sampler-steps", "1", "--no-progress"]
    assert cli_main(args) == 0
    assert (root / "results.md").exists()
    steps = args.index("--steps") + 1
    assert cli_main([*args[:steps], "8", *args[steps + 1:]]) == 2
    assert "steps: 4 there, 8 now" in capsys.readouterr().err
    assert cli_main(["zoo", "--zoo", str(zoo_file), "--out", str(root), "--entries", "typo"]) == 2
