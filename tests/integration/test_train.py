"""Training end to end on tiny models and synthetic data: exact resume, run-directory safety,
checkpoint validation, NaN handling, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moedit.cli.main import main as cli_main
from moedit.config import ConfigError, from_dict
from moedit.train import checkpoint as ckpt
from moedit.train.trainer import Trainer, TrainingError

torch.set_num_threads(2)


def tiny_config(out_dir: Path, **train) -> dict:
    return {
        "seed": 3,
        "model": {
            "preset": "micro", "image_size": 8, "patch_size": 2, "class_dropout": 0.2,
            "moe": {"num_experts": 4, "expert_ratio": 1.0, "num_shared": 1,
                    "router": {"top_k": 2, "selection_bias": True, "bias_update_rate": 0.01}},
        },
        "data": {"name": "synthetic", "image_size": 8},
        "train": {"out_dir": str(out_dir), "steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2,
                  "ckpt_every": 3, "log_every": 2, "ema_decay": 0.9, "grad_accum": 2, **train},
        "sample": {"steps": 2, "per_class": 1, "cfg_scale": 2.0},
    }


def run_training(data: dict, resume: bool = False) -> Trainer:
    trainer = Trainer(from_dict(data), resume=resume, progress=False)
    trainer.train()
    return trainer


def final_tensors(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.list_checkpoints(run_dir / "checkpoints")[-1] / name))


def test_resume_is_exact(tmp_path):
    straight = tmp_path / "straight"
    run_training(tiny_config(straight))
    split = tmp_path / "split"
    run_training(tiny_config(split, steps=3))
    run_training(tiny_config(split, steps=6), resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = final_tensors(straight, name), final_tensors(split, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    # the selection bias moved (it is part of the resumed state) and the runs agree on it
    bias_keys = [k for k in final_tensors(straight) if k.endswith("bias_E")]
    assert bias_keys and any(final_tensors(straight)[k].abs().sum() > 0 for k in bias_keys)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """20 grey 8×8 PNGs in 2 classes: 2 batches of 8 per epoch, so 6 steps of 2 micro-batches cross epochs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pngs")
    gen = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i in range(10):
            pixels = (torch.rand(8, 8, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_resume_mid_epoch_is_exact_with_lazy_data_read_by_workers(tmp_path, png_folder, monkeypatch):
    """The straight run reads in the step, the resumed one through 2 DataLoader workers, split mid-epoch:
    the same batches, so the same weights; the checkpoint records where the batch order stands."""
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))

    def lazy(out, workers, **train):
        data = tiny_config(out, ckpt_every=0, **train)
        data["data"] = {"name": "folder", "path": str(png_folder), "lazy": True, "workers": workers}
        data["model"]["in_channels"] = 1
        return data

    run_training(lazy(tmp_path / "straight", 0, steps=5))
    run_training(lazy(tmp_path / "split", 2, steps=2))  # 4 batches of 2 per epoch: step 2 is mid-epoch 2
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["data_position"] == {"epoch": 2, "batch_in_epoch": 0, "batches_per_epoch": 2, "dataset_size": 20,
                                      "batch_size": 8, "world": 1, "grad_accum": 2, "seed": 3}
    run_training(lazy(tmp_path / "split", 2, steps=5), resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = final_tensors(tmp_path / "straight", name), final_tensors(tmp_path / "split", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_with_a_changed_dataset_says_the_batches_differ(tmp_path, png_folder, monkeypatch, capsys):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path / "cache"))
    data = tiny_config(tmp_path / "run", steps=3, ckpt_every=0)
    data["data"] = {"name": "folder", "path": str(png_folder), "lazy": True}
    data["model"]["in_channels"] = 1
    run_training(data)
    extra = png_folder / "class0" / "extra.png"
    extra.write_bytes((png_folder / "class0" / "0.png").read_bytes())
    try:
        capsys.readouterr()
        run_training({**data, "train": {**data["train"], "steps": 4}}, resume=True)
        assert "dataset_size 20 → 21" in capsys.readouterr().out
    finally:
        extra.unlink()


def test_run_directory_contents(tmp_path):
    run = tmp_path / "run"
    trainer = run_training(tiny_config(run, keep_last=1))
    assert (run / "config.yaml").is_file() and (run / "samples" / "final.png").is_file()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000006"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert {"loss", "aux/balance", "aux/z", "lr", "grad_norm", "img_per_s"} <= rows[-1].keys()
    per_layer = sorted(k for k in rows[-1] if k.startswith("aux/balance/block"))  # each MoE layer's own value
    assert len(per_layer) == len(trainer.model.moe_layers()) > 1
    assert rows[-1]["aux/balance"] == pytest.approx(sum(rows[-1][k] for k in per_layer), rel=1e-5)  # summed
    assert any(k.startswith("route/maxvio/") for k in rows[-1])
    assert trainer.model.training  # sampling put the model back in training mode


def test_resuming_a_run_trained_with_averaged_aux_losses_says_how_to_keep_them(tmp_path, capsys):
    run = tmp_path / "run"
    run_training(tiny_config(run, steps=3))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["train"]["aux_over_layers"]  # as written before the key existed
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    run_training(tiny_config(run, steps=4), resume=True)
    assert "--set train.aux_over_layers=mean" in capsys.readouterr().out
    run_training(tiny_config(run, steps=5), resume=True)  # its config.yaml now has the key: no warning
    assert "aux_over_layers" not in capsys.readouterr().out


def test_existing_run_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    run_training(tiny_config(run, steps=3))
    before = (run / "checkpoints" / "step_00000003" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(from_dict(tiny_config(run, steps=3)), progress=False)
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").read_bytes() == before


def test_resume_with_other_model_config_is_refused(tmp_path):
    run = tmp_path / "run"
    run_training(tiny_config(run, steps=3))
    other = tiny_config(run, steps=6)
    other["model"]["moe"]["num_experts"] = 2
    with pytest.raises(ckpt.CheckpointError, match="model.moe.num_experts"):
        Trainer(from_dict(other), resume=True, progress=False)


def test_truncated_checkpoint_is_reported(tmp_path):
    run = tmp_path / "run"
    run_training(tiny_config(run, steps=3))
    path = run / "checkpoints" / "step_00000003" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        Trainer(from_dict(tiny_config(run, steps=6)), resume=True, progress=False)


def test_corrupt_checkpoint_of_same_size_is_reported(tmp_path):
    run = tmp_path / "run"
    run_training(tiny_config(run, steps=3))
    path = run / "checkpoints" / "step_00000003" / "ema.safetensors"
    raw = bytearray(path.read_bytes())
    raw[:8] = b"\xff" * 8  # header length garbage, same file size
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(from_dict(tiny_config(run, steps=6)), resume=True, progress=False)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    run = tmp_path / "run"
    run_training(tiny_config(run, steps=3))
    trainer = Trainer(from_dict(tiny_config(run, steps=6)), resume=True, progress=False)
    with torch.no_grad():
        trainer.model.final_layer.linear.weight.fill_(math.nan)
    with pytest.raises(TrainingError, match="non-finite at step 4.*step_00000003 is intact"):
        trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000003"]


def test_aux_loss_without_weight_is_an_error(tmp_path):
    # every built-in loss has a default weight; a custom router's new loss name needs one set
    data = tiny_config(tmp_path / "run")
    data["train"]["aux_weights"] = {"balance": 0.5}
    trainer = Trainer(from_dict(data), progress=False)
    assert trainer.cfg.train.aux_weights["balance"] == 0.5 and trainer.cfg.train.aux_weights["z"] == 0.0
    with pytest.raises(ConfigError, match="train.aux_weights.mystery"):
        trainer.weighted_aux({"mystery": torch.tensor(1.0)})


def test_data_that_does_not_fit_the_model(tmp_path):
    data = tiny_config(tmp_path / "run")
    data["data"]["image_size"] = 16
    with pytest.raises(ConfigError, match="model.image_size=16"):
        Trainer(from_dict(data), progress=False)


def test_cli_train_dry_run_and_sample(tmp_path, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", steps=2, ckpt_every=0)))
    assert cli_main(["train", "-c", str(cfg_path), "--dry-run", "--set", "train.lr=3e-4"]) == 0
    assert "lr: 0.0003" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    assert cli_main(["train", "-c", str(cfg_path), "--no-progress"]) == 0
    out = tmp_path / "grid.png"
    npz = tmp_path / "s.npz"
    assert cli_main(["sample", "--run", str(tmp_path / "run"), "--out", str(out), "--npz", str(npz),
                     "--set", "sample.per_class=2"]) == 0
    import numpy as np

    arrays = np.load(npz)
    assert arrays["images"].shape == (20, 1, 8, 8) and arrays["images"].dtype == np.uint8
    assert out.is_file()
    # user mistakes give one line on stderr and exit code 2
    assert cli_main(["train", "-c", str(cfg_path), "--set", "model.widht=3"]) == 2
    assert "unknown config key model.widht" in capsys.readouterr().err
    assert cli_main(["train", "-c", str(cfg_path), "--no-progress"]) == 2  # run exists
    assert cli_main(["sample", "--run", str(tmp_path / "nowhere")]) == 2


def test_bf16_autocast_training_runs_on_cpu(tmp_path):
    # the CUDA default (bf16 autocast, float32 parameters) exercised on CPU: experts run in bf16,
    # gates stay float32, parameters and checkpoints stay float32
    trainer = run_training(tiny_config(tmp_path / "run", steps=3, precision="bf16"))
    assert trainer.amp_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(v.dtype == torch.float32 for v in final_tensors(tmp_path / "run").values() if v.is_floating_point())


def test_resuming_a_finished_run_keeps_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_training(tiny_config(run, steps=3))
    before = (run / "checkpoints" / "step_00000003" / "model.safetensors").read_bytes()
    trainer = run_training(tiny_config(run, steps=3), resume=True)
    assert trainer.start_step == 3
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").read_bytes() == before
