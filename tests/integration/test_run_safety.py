"""A run directory under bad luck: two writers, a killed writer's stale lock, partial checkpoints left by
a kill, a full disk during a save, same-size damage, NaN weights, a damaged state.json, weights of
another shape, `--resume` where there is nothing to resume. Each case reproduces the failure and
checks that nothing already written is lost and that the message says what to do."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moedit.cli.main import main as cli_main
from moedit.config import from_dict
from moedit.train import checkpoint as ckpt
from moedit.train.trainer import Trainer, TrainingError
from moedit.utils.files import file_sha256
from moedit.utils.lock import LOCK_NAME

SRC = Path(__file__).parents[2] / "src"
pytestmark = pytest.mark.usefixtures("one_thread")


def config(out_dir: Path, **train) -> dict:
    return {
        "seed": 1,
        "model": {"preset": "micro", "image_size": 8, "patch_size": 2,
                  "moe": {"num_experts": 4, "expert_ratio": 1.0, "router": {"top_k": 1}}},
        "data": {"name": "synthetic", "image_size": 8},
        "train": {"out_dir": str(out_dir), "steps": 3, "batch_size": 4, "ckpt_every": 3, "log_every": 3,
                  "warmup_steps": 1, **train},
        "sample": {"steps": 1, "per_class": 1},
        "diagnostics": {"monitor": False},
    }


def train(out_dir: Path, resume: bool = False, **kw) -> Trainer:
    trainer = Trainer(from_dict(config(out_dir, **kw)), resume=resume, progress=False)
    trainer.train()
    return trainer


def step3(run: Path) -> Path:
    return run / "checkpoints" / "step_00000003"


def rewrite(path: Path, name: str, change) -> None:
    """Re-save one checkpoint file with `change(tensors)` applied and record its new size and sha256, as a
    run that produced such weights would have: only moedit's own checks on the content can catch it."""
    tensors = load_file(str(path / name))
    change(tensors)
    save_file(tensors, str(path / name))
    state = json.loads((path / "state.json").read_text())
    state["file_sizes"][name] = (path / name).stat().st_size
    state["checksums"][name] = file_sha256(path / name)
    (path / "state.json").write_text(json.dumps(state))


# ----------------------------------------------------------------------------- two writers


def test_a_second_writer_is_refused_with_the_holder_and_can_start_after(tmp_path):
    run = tmp_path / "run"
    first = Trainer(from_dict(config(run)), progress=False)
    for resume in (False, True):  # a fresh run and a --resume beside a run still training
        with pytest.raises(TrainingError, match=rf"in use by pid {os.getpid()} on host .* started"):
            Trainer(from_dict(config(run, steps=6)), resume=resume, progress=False)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME, "config.yaml"]  # the refused ones wrote nothing
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 3  # still the holder's config
    first.train()
    assert (run / LOCK_NAME).read_text() == ""  # released cleanly
    train(run, resume=True, steps=6)  # the lock is free again
    assert (run / "checkpoints" / "step_00000006").is_dir()


def _cli(tmp_path: Path, cfg: dict, *flags: str, background: bool = False):
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moedit.cli.main", "train", "-c", str(path), "--no-progress", *flags]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_concurrent_processes_are_refused_and_a_killed_holder_leaves_a_stale_lock_that_is_cleared(tmp_path):
    run = tmp_path / "run"
    long = config(run, steps=100000, ckpt_every=2, log_every=1)
    holder = _cli(tmp_path, long, background=True)
    try:
        _wait_for(lambda: (run / "checkpoints" / "step_00000002").is_dir())
        for flags in ((), ("--resume",), ("--resume-or-start",)):
            refused = _cli(tmp_path, config(run, steps=6), *flags)
            assert refused.returncode == 2, refused.stderr
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1 and f"in use by pid {holder.pid}" in lines[0] and "Traceback" not in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid  # the kill left its description
    latest = int(ckpt.list_checkpoints(run / "checkpoints")[-1].name.removeprefix("step_"))
    resumed = _cli(tmp_path, config(run, steps=latest + 2, ckpt_every=2, log_every=1), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"cleared a stale lock on {run} left by pid {holder.pid}" in resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, latest + 3))  # one writer's history: no row twice, none interleaved


# ----------------------------------------------------------------------------- partial checkpoints


def test_partial_checkpoints_of_a_killed_save_are_swept_and_an_interrupted_same_step_save_restored(tmp_path):
    run = tmp_path / "run"
    train(run)
    root = run / "checkpoints"
    (root / ".tmp-step_00000006-4242").mkdir()
    (root / ".tmp-step_00000006-4242" / "model.safetensors").write_bytes(b"\0" * 100_000)
    os.replace(step3(run), root / ".old-step_00000003-777")  # killed between the two renames
    trainer = Trainer(from_dict(config(run, steps=6)), resume=True, progress=False)
    assert trainer.start_step == 3  # the only complete copy was put back and resumed from
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    trainer.train()


def test_a_kill_while_an_old_checkpoint_is_deleted_never_leaves_a_partial_step_directory(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(run, keep_last=1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # one file gone, then the process dies
        next(Path(path).glob("*.safetensors")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(run, resume=True, steps=6, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    for path in ckpt.list_checkpoints(run / "checkpoints"):  # found by the kill campaign: a step_* dir
        ckpt.read_state(path)  # whose deletion was cut short passed for a checkpoint
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000006"]
    trainer = Trainer(from_dict(config(run, steps=6, keep_last=1)), resume=True, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006"]  # swept
    trainer.close()


def test_a_failed_save_removes_its_partial_directory_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(run)
    before = (step3(run) / "model.safetensors").read_bytes()
    real_save = ckpt.save_file

    def disk_fills_up(tensors, filename):
        if filename.endswith("ema.safetensors"):
            Path(filename).write_bytes(b"\0" * 1000)  # part of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real_save(tensors, filename)

    monkeypatch.setattr(ckpt, "save_file", disk_fills_up)
    with pytest.raises(TrainingError, match=r"step 6 was not written: cannot write .*No space left on device.*"
                                            r"step_00000003 is intact"):
        train(run, resume=True, steps=6)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    assert (step3(run) / "model.safetensors").read_bytes() == before
    monkeypatch.setattr(ckpt, "save_file", real_save)
    train(run, resume=True, steps=6)  # space freed: the run continues from the intact checkpoint


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_gives_one_line_and_the_run_resumes_once_space_is_freed(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "8m"):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission); the simulated ENOSPC test covers it")
    try:
        run = disk / "run"
        assert _cli(tmp_path, config(run)).returncode == 0
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the disk up to the last few kilobytes
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - 16384))
        full = _cli(tmp_path, config(run, steps=6), "--resume")
        assert full.returncode == 2, full.stderr[-2000:]
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in full.stderr, full.stderr
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        ckpt.read_state(step3(run))  # intact
        filler.unlink()
        again = _cli(tmp_path, config(run, steps=6), "--resume")
        assert again.returncode == 0, again.stderr[-2000:]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------- integrity


def test_same_size_damage_is_caught_by_the_checksum_in_every_command(tmp_path, capsys):
    run = tmp_path / "run"
    train(run)
    path = step3(run) / "ema.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # one flipped bit in the last weight: still a valid safetensors file of the same size
    path.write_bytes(bytes(raw))
    assert cli_main(["sample", "--run", str(run), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ema.safetensors is damaged (its sha256 differs" in err and "--resume" in err
    with pytest.raises(ckpt.CheckpointError, match="sha256 differs"):
        Trainer(from_dict(config(run, steps=6)), resume=True, progress=False)


def test_non_finite_weights_are_refused_on_load_and_never_written(tmp_path):
    run = tmp_path / "run"
    trainer = train(run)

    def poison(tensors):
        key = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[key] = torch.full_like(tensors[key], float("nan"))

    rewrite(step3(run), "ema.safetensors", poison)
    with pytest.raises(ckpt.CheckpointError, match="ema.safetensors: tensor .* holds NaN or inf"):
        Trainer(from_dict(config(run, steps=6)), resume=True, progress=False)
    with torch.no_grad():
        next(trainer.ema.model.parameters()).fill_(float("inf"))
    with pytest.raises(ckpt.CheckpointError, match="refusing to write ema.safetensors"):
        ckpt.save_checkpoint(run / "checkpoints", 9, trainer.model, trainer.ema.model, trainer.optimizer, {})
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003"]


@pytest.mark.parametrize("damage, field", [
    (lambda s: [s], "holds a list"),
    (lambda s: {k: v for k, v in s.items() if k != "step"}, "no field 'step'"),
    (lambda s: {**s, "step": "3"}, "field 'step' is '3'"),
    (lambda s: {**s, "step": True}, "field 'step' is True"),
    (lambda s: {**s, "model_config": []}, "field 'model_config'"),
    (lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "no field 'optimizer'"),
    (lambda s: {**s, "optimizer": {"param_groups": 3}}, "optimizer.param_groups"),
    (lambda s: {**s, "file_sizes": {"model.safetensors": "big"}}, "field 'file_sizes' has a bad entry"),
    (lambda s: {**s, "ema_updates": -1}, "out of range"),
    (lambda s: {**s, "world_size": 1.5}, "field 'world_size'"),
])
def test_a_damaged_state_json_names_the_field(tmp_path, damage, field):
    run = tmp_path / "run"
    train(run)
    path = step3(run) / "state.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(ckpt.CheckpointError, match=field.replace("(", r"\(")) as info:
        ckpt.read_state(step3(run))
    assert "--resume" in str(info.value)


def test_weights_of_another_shape_are_a_checkpoint_error(tmp_path):
    run = tmp_path / "run"
    train(run)

    def widen(tensors):
        tensors["final_layer.linear.bias"] = torch.zeros(tensors["final_layer.linear.bias"].numel() + 1)

    rewrite(step3(run), "model.safetensors", widen)
    with pytest.raises(ckpt.CheckpointError, match=r"final_layer.linear.bias is \(\d+,\) there but"):
        Trainer(from_dict(config(run, steps=6)), resume=True, progress=False)


def test_a_checkpoint_from_before_checksums_still_loads(tmp_path):
    run = tmp_path / "run"
    train(run)
    state = json.loads((step3(run) / "state.json").read_text())
    for key in ("checksums", "world_size"):
        del state[key]
    (step3(run) / "state.json").write_text(json.dumps(state))
    tensors = load_file(str(step3(run) / "trainer.safetensors"))
    tensors["rng.cpu"] = tensors.pop("rng.cpu.rank0")  # the older single-process layout
    save_file(tensors, str(step3(run) / "trainer.safetensors"))
    state["file_sizes"]["trainer.safetensors"] = (step3(run) / "trainer.safetensors").stat().st_size
    (step3(run) / "state.json").write_text(json.dumps(state))
    straight = tmp_path / "straight"
    train(straight, steps=6)
    train(run, resume=True, steps=6)
    a, b = (load_file(str(r / "checkpoints" / "step_00000006" / "model.safetensors")) for r in (straight, run))
    assert all(torch.equal(a[k], b[k]) for k in a)  # one process: the old layout resumes exactly


# ----------------------------------------------------------------------------- --resume


def test_resume_needs_a_checkpoint_unless_resume_or_start(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(run)))
    assert cli_main(["train", "-c", str(cfg), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint to continue from" in err and "--resume-or-start" in err
    assert not run.exists()  # a refused start leaves no trace, not even the folder it made for its lock
    assert cli_main(["train", "-c", str(cfg), "--resume-or-start", "--no-progress"]) == 0
    assert step3(run).is_dir()
    shutil.rmtree(run)


def test_a_kill_while_resume_rewrites_config_yaml_leaves_the_old_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(run)
    before = (run / "config.yaml").read_text()
    import moedit.utils.files as files

    def killed(src, dst):  # the process dies after writing the new text, before it is published
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(from_dict(config(run, steps=6, lr=5e-4)), resume=True, progress=False)
    monkeypatch.undo()
    assert (run / "config.yaml").read_text() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".config.yaml")]
    train(run, resume=True, steps=6)  # and the lock was released by the failed start


def test_an_aux_weight_no_loss_uses_is_reported_once(tmp_path, capsys):
    train(tmp_path / "run", aux_weights={"balanse": 0.1})
    out = capsys.readouterr().out
    assert out.count("train.aux_weights has ['balanse']") == 1 and "check the spelling" in out
