"""Sharded checkpoints through `moedit train` under torchrun (CPU, gloo).

A 2-process FSDP2 + expert-parallel (ep 2) run writes DCP checkpoints; they must load with identical
weights, EMA and optimizer state at world 1 (no sharding) and at world 4 with ep 4, the final one must
carry single-file weights equal to them, and `moedit export` must write the others'. A rank killed in the
middle of a save must end the run promptly, leave the previous checkpoint intact, and a resume must
continue from it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

SRC = Path(__file__).parents[2] / "src"

# load a run with --resume and dump what was restored (full tensors, on rank 0)
DUMP = r'''
import sys, torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from moedit.config import load_config
from moedit.distributed.setup import shutdown
from moedit.train.trainer import Trainer
torch.set_num_threads(1)
cfg_path, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
trainer = Trainer(load_config(cfg_path, overrides), resume=True, progress=False)
full = StateDictOptions(full_state_dict=True, cpu_offload=True)
model, optim = get_state_dict(trainer.model, trainer.optimizer, options=full)
ema = get_model_state_dict(trainer.ema.model, options=full)
if trainer.dist.is_main:
    torch.save({"model": model, "ema": ema, "optim": optim["state"], "step": trainer.start_step}, out)
trainer.close()
shutdown()  # as `moedit train` ends: a process group left open can abort the process at exit
'''

# `moedit train`, with rank 1 killed when it starts writing the shards of step 4
KILL = r'''
import os, sys, torch.distributed as dist
import moedit.train.sharded_checkpoint as sharded
save = sharded.dcp.save
def dying_save(state, checkpoint_id):
    if dist.get_rank() == 1 and "step_00000004" in str(checkpoint_id):
        os._exit(3)
    return save(state, checkpoint_id=checkpoint_id)
sharded.dcp.save = dying_save
from moedit.cli.main import main
sys.exit(main(["train", "-c", sys.argv[1], "--no-progress"]))
'''


def _config(tmp_path: Path, run: str) -> Path:
    cfg = {"model": {"preset": "micro", "image_size": 8, "patch_size": 2,
                     "moe": {"num_experts": 4, "expert_ratio": 1.0, "router": {"top_k": 2}}},
           "data": {"name": "synthetic", "image_size": 8},
           "train": {"out_dir": str(tmp_path / run), "steps": 4, "batch_size": 4, "ckpt_every": 2, "log_every": 2,
                     "keep_last": 5},
           "sample": {"steps": 2, "per_class": 1},
           "parallel": {"data": "fsdp", "ep": 2}}
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str], nproc: int | None, port: int, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run",
                                                      f"--nproc_per_node={nproc}", f"--master_port={port}"]
    return subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=timeout)


def _same(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ"
    for key in a:
        if isinstance(a[key], dict):
            _same(a[key], b[key], f"{what}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key].float(), b[key].float()), f"{what}.{key} differs"


@pytest.mark.slow
def test_sharded_checkpoint_loads_at_other_world_sizes(tmp_path):
    cfg = _config(tmp_path, "run")
    trained = _run(["-m", "moedit.cli.main", "train", "-c", str(cfg), "--no-progress"], 2, 29545)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    final, middle = ckpts / "step_00000004", ckpts / "step_00000002"
    assert (final / "sharded" / ".metadata").is_file() and (final / "ema.safetensors").is_file()
    assert not (middle / "model.safetensors").exists()  # only the final checkpoint is exported by the run

    dump = tmp_path / "dump.py"
    dump.write_text(DUMP)
    shutil.copytree(tmp_path / "run", tmp_path / "run4")
    one = _run([str(dump), str(cfg), str(tmp_path / "w1.pt"), "parallel.ep=1", "parallel.data=ddp"], None, 0)
    assert one.returncode == 0, one.stderr[-3000:]
    four = _run([str(dump), str(cfg), str(tmp_path / "w4.pt"), f"train.out_dir={tmp_path / 'run4'}", "parallel.ep=4"],
                4, 29546)
    assert four.returncode == 0, four.stderr[-3000:]
    w1, w4 = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w4.pt")
    assert w1["step"] == w4["step"] == 4
    _same(w1, w4, "world 1 vs world 4 (ep 4)")
    exported = load_file(str(final / "model.safetensors"))
    _same({k: v for k, v in w1["model"].items()}, exported, "final model.safetensors")
    assert w1["optim"], "the optimizer state was restored"

    result = _run(["-m", "moedit.cli.main", "export", str(tmp_path / "run"), "--all"], None, 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step_00000002: model.safetensors, ema.safetensors written" in result.stdout
    assert load_file(str(middle / "ema.safetensors")).keys() == exported.keys()


@pytest.mark.slow
def test_rank_killed_mid_save_keeps_the_previous_checkpoint(tmp_path):
    cfg = _config(tmp_path, "run")
    script = tmp_path / "kill.py"
    script.write_text(KILL)
    start = time.monotonic()
    killed = _run([str(script), str(cfg)], 2, 29547)
    elapsed = time.monotonic() - start
    assert killed.returncode != 0
    assert elapsed < 120, f"the surviving rank took {elapsed:.0f} s to stop"
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000002"]
    assert any(p.name.startswith(".tmp-step_00000004") for p in ckpts.iterdir())

    resumed = _run(["-m", "moedit.cli.main", "train", "-c", str(cfg), "--resume", "--no-progress"], None, 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed the unfinished checkpoint" in resumed.stdout + resumed.stderr
    assert (ckpts / "step_00000004" / "model.safetensors").is_file()
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
