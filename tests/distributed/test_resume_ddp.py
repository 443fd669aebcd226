"""Resume under torchrun (2 gloo processes through the real CLI): every rank's RNG state is in the
checkpoint and comes back to its own rank, so stopping after 3 steps and resuming to 6 gives bit for bit
the weights of an uninterrupted 6-step run; resuming on another world size says what it cannot
reproduce. Each run also ends cleanly (barrier, process-group shutdown) with its final files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

SRC = Path(__file__).parents[2] / "src"


def _config(run: Path, steps: int) -> dict:
    return {
        "seed": 5,
        "model": {"preset": "micro", "image_size": 8, "patch_size": 2, "class_dropout": 0.3,
                  "moe": {"num_experts": 4, "expert_ratio": 1.0, "router": {"top_k": 1}}},
        "data": {"name": "synthetic", "image_size": 8},
        "train": {"out_dir": str(run), "steps": steps, "batch_size": 4, "ckpt_every": 3, "log_every": 3,
                  "warmup_steps": 1},
        "sample": {"steps": 1, "per_class": 1},
    }


def _train(tmp_path: Path, run: Path, steps: int, nproc: int, *flags: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"{run.name}_{steps}_{nproc}.yaml"
    cfg.write_text(yaml.safe_dump(_config(run, steps)))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
                if nproc > 1 else [sys.executable, "-m"])
    cmd = [*launcher, "moedit.cli.main", "train", "-c", str(cfg), "--no-progress", "--set", "train.threads=1", *flags]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _final(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "step_00000006" / name))


@pytest.mark.slow
def test_two_rank_resume_is_bit_exact_and_other_world_sizes_say_so(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(tmp_path, straight, 6, 2)
    _train(tmp_path, split, 3, 2)
    state3 = json.loads((split / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state3["world_size"] == 2
    rng = load_file(str(split / "checkpoints" / "step_00000003" / "trainer.safetensors"))
    assert not torch.equal(rng["rng.cpu.rank0"], rng["rng.cpu.rank1"])  # each rank its own stream
    _train(tmp_path, split, 6, 2, "--resume")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = _final(straight, name), _final(split, name)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after a 2-rank resume"
    for run in (straight, split):  # the end of each run: rank 0's last files are all there
        assert (run / "samples" / "final.png").is_file() and (run / "summary.json").is_file()

    # the same checkpoint resumed by one process: restored, with a note on what differs from here on
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    os.symlink(split / "checkpoints" / "step_00000003", other / "checkpoints" / "step_00000003")
    result = _train(tmp_path, other, 4, 1, "--resume")
    note = result.stdout + result.stderr
    assert "written by 2 process(es) and resumes on 1" in note and "differ from an uninterrupted run" in note
