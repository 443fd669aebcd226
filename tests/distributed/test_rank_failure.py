"""A rank that dies or stops answering ends the others promptly with one clear error (CPU, gloo).

The ranks are started by hand (RANK/WORLD_SIZE/MASTER_ADDR, as a scheduler such as SLURM's srun does),
not by torchrun: torchrun would stop the survivors itself, and the point is what a surviving rank does
on its own. Rank 1 either exits mid-training or freezes (SIGSTOP); rank 0 must exit with moedit's
lost-contact message (no traceback) within parallel.timeout_s plus a margin.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

SRC = Path(__file__).parents[2] / "src"
TIMEOUT_S = 10

# `moedit train`, with rank 1 failing FAULT_AFTER seconds after start (while training: set-up is ~3 s)
SCRIPT = r'''
import os, signal, sys, threading
from moedit.cli.main import main
if os.environ["RANK"] == "1":
    fault = os.environ["FAULT"]
    def strike():
        if fault == "die":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGSTOP)  # alive, holding its sockets, answering nothing
    threading.Timer(float(os.environ["FAULT_AFTER"]), strike).start()
sys.exit(main(["train", "-c", sys.argv[1], "--no-progress"]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_with_fault(tmp_path: Path, fault: str) -> tuple[subprocess.CompletedProcess, float]:
    cfg = {"model": {"preset": "micro", "image_size": 8, "patch_size": 2,
                     "moe": {"num_experts": 4, "expert_ratio": 1.0, "router": {"top_k": 2}}},
           "data": {"name": "synthetic", "image_size": 8},
           "train": {"out_dir": str(tmp_path / "run"), "steps": 100_000, "batch_size": 4, "ckpt_every": 0,
                     "log_every": 50},
           "sample": {"steps": 2, "per_class": 1},
           "parallel": {"data": "fsdp", "ep": 2, "timeout_s": TIMEOUT_S}}
    cfg_path, script = tmp_path / "cfg.yaml", tmp_path / "fault.py"
    cfg_path.write_text(yaml.safe_dump(cfg))
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "FAULT": fault, "FAULT_AFTER": "6"}
    cmd = [sys.executable, str(script), str(cfg_path)]
    other = subprocess.Popen(cmd, env={**env, "RANK": "1", "LOCAL_RANK": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        survivor = subprocess.run(cmd, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, capture_output=True,
                                  text=True, timeout=180)
        return survivor, time.monotonic() - start
    finally:
        if other.poll() is None:
            other.send_signal(signal.SIGKILL)  # a stopped process takes no SIGTERM until continued
        other.wait()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["die", "hang"])
def test_surviving_rank_stops_with_a_clear_error(tmp_path, fault):
    survivor, elapsed = _run_with_fault(tmp_path, fault)
    assert survivor.returncode == 3, survivor.stderr[-3000:]
    assert "rank 0 of 2 lost contact with the other ranks" in survivor.stderr
    assert f"parallel.timeout_s = {TIMEOUT_S} s" in survivor.stderr and "--resume" in survivor.stderr
    assert "Traceback" not in survivor.stderr
    # a dead peer is noticed at once (its sockets close); a frozen one after timeout_s
    assert elapsed < 6 + TIMEOUT_S + 40, f"rank 0 took {elapsed:.0f} s to stop"


def test_lost_peer_message_only_for_a_lost_peer_in_a_multi_rank_run(monkeypatch):
    from moedit.distributed import setup

    gloo = RuntimeError("[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging")
    monkeypatch.setattr(setup, "_TIMEOUT_S", None)
    assert setup.lost_peer_message(gloo) is None  # one process: not a lost peer, the traceback stays
    monkeypatch.setattr(setup, "_TIMEOUT_S", 30.0)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    message = setup.lost_peer_message(gloo)
    assert message.startswith("rank 2 of 4 lost contact with the other ranks (Read error [127.0.0.1]:1: "
                              "Connection reset by peer)")
    assert "parallel.timeout_s = 30 s" in message
    assert setup.lost_peer_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert setup.lost_peer_message(ValueError("timed out")) is None
