"""`moedit autoencoder train` end to end on synthetic data, at a tiny size: the files it writes, exact
resume, a second start refused with nothing changed, then a latent DiT trained through it (codec.path =
the run) that samples decoded images, and `moedit autoencoder eval` of the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from moedit.cli.main import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["data.name=synthetic", "model.channels=[8, 8]", "model.groups=4", "train.batch_size=8",
        "train.warmup_steps=1", "train.log_every=2", "train.ckpt_every=2", "train.stat_images=64",
        "eval.images=64", "train.threads=1"]


def _train(out, steps, *extra) -> int:
    return cli_main(["autoencoder", "train", "--no-progress", "--set", *TINY, f"train.out_dir={out}",
                     f"train.steps={steps}", *extra])


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    assert _train(out, 4) == 0
    return out


def test_a_run_writes_the_codec_files_and_its_quality(ae_run):
    names = {p.name for p in ae_run.iterdir()}
    assert {"autoencoder.safetensors", "autoencoder.json", "reconstructions.png", "reconstruction.json",
            "config.yaml", "metrics.jsonl", "summary.json", "checkpoints"} <= names
    record = json.loads((ae_run / "autoencoder.json").read_text())
    assert record["scale"] > 0 and record["latent_statistics"]["images"] == 64
    assert record["reconstruction"]["images"] == 64 and "psnr_db" in record["reconstruction"]
    rows = [json.loads(line) for line in (ae_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and {"rec", "kl", "loss", "img_per_s"} <= set(rows[0])
    ema = load_file(str(ae_run / "checkpoints" / "step_00000004" / "ema.safetensors"))
    exported = load_file(str(ae_run / "autoencoder.safetensors"))
    assert all(torch.equal(ema[k], exported[k]) for k in exported)  # the EMA weights are what is exported


def test_resume_is_exact_and_a_second_start_changes_nothing(ae_run, tmp_path, capsys):
    split = tmp_path / "split"
    assert _train(split, 2) == 0
    assert _train(split, 4, "--resume") == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(ae_run / "checkpoints" / "step_00000004" / name))
        b = load_file(str(split / "checkpoints" / "step_00000004" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    before = {p.name: p.stat().st_mtime_ns for p in split.iterdir() if p.name != ".moedit.lock"}
    capsys.readouterr()
    assert _train(split, 6) == 2
    assert "already holds an autoencoder run" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in split.iterdir() if p.name != ".moedit.lock"} == before
    fresh = tmp_path / "fresh"
    assert _train(fresh, 2, "data.name=nonsense") == 2
    assert "data.name='nonsense'" in capsys.readouterr().err and not fresh.exists()
    assert _train(fresh, 2, "model.in_channels=3") == 2
    assert "set model.in_channels=1" in capsys.readouterr().err and not fresh.exists()  # no empty run left


def test_a_latent_dit_trains_samples_and_evaluates_through_the_run(ae_run, tmp_path, capsys):
    cfg = {"seed": 0,
           "model": {"preset": "micro", "image_size": 14, "in_channels": 4, "patch_size": 2,
                     "moe": {"num_experts": 2, "expert_ratio": 1.0, "router": {"top_k": 1}}},
           "data": {"name": "synthetic"},
           "codec": {"name": "autoencoder", "path": str(ae_run)},
           "train": {"out_dir": str(tmp_path / "dit"), "steps": 2, "batch_size": 4, "warmup_steps": 1,
                     "ckpt_every": 0, "log_every": 1, "threads": 1},
           "sample": {"steps": 2, "per_class": 1}}
    config = tmp_path / "latent.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", "-c", str(config), "--no-progress"]) == 0
    saved = yaml.safe_load((tmp_path / "dit" / "config.yaml").read_text())["codec"]
    record = json.loads((ae_run / "autoencoder.json").read_text())
    assert saved["scale"] == pytest.approx(record["scale"]) and saved["shift"] == pytest.approx(record["shift"])
    npz = tmp_path / "s.npz"
    assert cli_main(["sample", "--run", str(tmp_path / "dit"), "--npz", str(npz)]) == 0
    assert np.load(npz)["images"].shape == (10, 1, 28, 28)  # decoded through the autoencoder
    capsys.readouterr()
    report = tmp_path / "r.json"
    assert cli_main(["autoencoder", "eval", "--codec", str(ae_run), "--images", "16", "--json", str(report)]) == 0
    assert "16 images: PSNR" in capsys.readouterr().out
    assert json.loads(report.read_text())["images"] == 16
