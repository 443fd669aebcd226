"""Data-parallel training under torchrun: 2 CPU processes (gloo) train a tiny MoE-DiT; rank 0 writes
the run, both ranks end with identical weights and the same aux-free selection bias."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from moedit.diagnostics.record import RoutingRecord

SCRIPT = """
import sys, torch
from moedit.config import load_config
from moedit.train.trainer import Trainer
torch.set_num_threads(1)
trainer = Trainer(load_config(sys.argv[1]), progress=False)
trainer.train()
rank = trainer.dist.rank
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, sys.argv[2] + f"/rank{rank}.safetensors")
"""


@pytest.mark.slow
def test_two_process_ddp(tmp_path):
    cfg = {
        "model": {"preset": "micro", "image_size": 8, "patch_size": 2,
                  # column-major experts: DDP's gradient buckets follow the parameters' strides
                  # (test_router_ddp.py trains the default row-major layout)
                  "moe": {"num_experts": 4, "expert_ratio": 1.0, "expert_layout": "col",
                          "router": {"top_k": 1, "selection_bias": True, "bias_update_rate": 0.01}}},
        "data": {"name": "synthetic", "image_size": 8},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 8, "ckpt_every": 0, "log_every": 2},
        "sample": {"steps": 2, "per_class": 1},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(script), str(cfg_path), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for key in rank0:
        assert (rank0[key] == rank1[key]).all(), f"{key} differs between ranks"
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if k.endswith("bias_E"))
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    routing = RoutingRecord(tmp_path / "run")  # rank 0 wrote the monitor's counts summed over both ranks
    assert list(routing.records["step"]) == [1, 2, 3, 4]
    assert (routing.records["tokens"] == 2 * 8 * 16).all()  # 2 ranks x 8 images x 16 tokens
