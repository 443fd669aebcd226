"""Bad inputs get one clear line, before anything runs: never a traceback, never silent acceptance.

Each row of BAD_INPUTS is a `moedit` command line and a fragment its message must hold (the key or
path at fault). It runs in-process through `moedit.cli.main.main`, which must return 2 and print exactly
one stderr line `moedit <cmd>: error: ...`. The model is never built for these rows: every check fires
before it (the `no_model` fixture turns building one into a test failure).

Unwritable outputs: the tests run as root, and root ignores permission bits (a chmod 0o500 folder stays
writable to it), so "cannot write here" is made with paths that fail for root too: a folder under /proc
(which refuses new entries) and a path whose parent is a regular file. A full disk is simulated by making
the writer raise OSError(ENOSPC) (DISK_FULL).
"""

from __future__ import annotations

import errno
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moedit.cli.main import main as cli_main
from moedit.config import from_dict
from moedit.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROC = "/proc/moedit_out"  # /proc refuses new entries, even to root


def tiny_run_config(out_dir: Path, moe: bool, data: str = "synthetic") -> dict:
    """A micro model at the feature classifier's 1x28x28 and 10 classes (so `moedit eval` gets past its
    checks), trained 2 steps on synthetic data: about a second."""
    model = {"preset": "micro", "image_size": 28, "patch_size": 4, "in_channels": 1, "num_classes": 10}
    if moe:
        model["moe"] = {"num_experts": 2, "expert_ratio": 1.0, "router": {"top_k": 1}}
    return {
        "seed": 0, "model": model,
        "data": {"name": data, "image_size": 28},
        "train": {"out_dir": str(out_dir), "steps": 2, "batch_size": 4, "warmup_steps": 0, "ckpt_every": 0,
                  "log_every": 1, "ema_decay": 0.5},
        "sample": {"steps": 1, "per_class": 1},
    }


@pytest.fixture(scope="module")
def paths(tmp_path_factory, one_thread) -> dict[str, str]:
    """Everything the rows name: trained runs, garbage files, a regular file to put paths under."""
    root = tmp_path_factory.mktemp("bad")
    runs = {"run": root / "moe_run", "dense": root / "dense_run"}
    for name, moe in (("run", True), ("dense", False)):
        Trainer(from_dict(tiny_run_config(runs[name], moe)), progress=False).train()
    # the MoE run as if trained on MNIST: eval's checks pass, and the output check comes before any data
    eval_run = root / "eval_run"
    os.makedirs(eval_run)
    os.symlink(runs["run"] / "checkpoints", eval_run / "checkpoints")
    cfg = yaml.safe_load((runs["run"] / "config.yaml").read_text())
    cfg["data"] = {"name": "mnist"}
    (eval_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    # runs whose default output folder is a file
    blocked = root / "blocked_run"
    os.makedirs(blocked)
    for name in ("checkpoints", "routing"):
        os.symlink(runs["run"] / name, blocked / name)
    (blocked / "config.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("eval", "diagnostics", "samples"):
        (blocked / name).write_text("a file where a folder goes\n")

    files = {
        "file": b"a regular file\n",
        "rand.safetensors": np.random.default_rng(0).bytes(4096),
        "text.safetensors": b"just some text, renamed\n",
        "empty.safetensors": b"",
        "text.pt": b"just some text, renamed\n",
        "rand.pt": np.random.default_rng(1).bytes(4096),
        "binary.yaml": np.random.default_rng(2).bytes(512),
        "latin1.yaml": "train:\n  out_dir: caf\xe9\n".encode("latin-1"),
        "nul.yaml": b"train:\n  lr: 1.0\x00\n",
        "broken.yaml": b"train: [\n  lr: 1\n",
        "overflow.yaml": b"train:\n  lr: 1e400\n",
        "nan.yaml": b"sample:\n  cfg_scale: .nan\n",
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    torch.save([torch.zeros(2)], root / "list.pt")
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "note": "text"}, root / "mixed.pt")
    (root / "folder.yaml").mkdir()
    (root / "folder.npz").mkdir()
    return {"tmp": str(root), "run": str(runs["run"]), "dense": str(runs["dense"]), "eval_run": str(eval_run),
            "blocked": str(blocked), **{name.replace(".", "_"): str(root / name) for name in files},
            "list_pt": str(root / "list.pt"), "mixed_pt": str(root / "mixed.pt"),
            "folder_yaml": str(root / "folder.yaml"), "folder_npz": str(root / "folder.npz")}


@dataclass(frozen=True)
class Row:
    argv: str  # the command line; {name} fields come from the `paths` fixture
    expected: str  # a fragment the message must hold: the key or the path at fault (placeholders allowed)

    def __str__(self) -> str:
        return self.argv


def dry(*overrides: str) -> str:
    return "train --dry-run --set " + " ".join(overrides)


MOE = "model.moe.num_experts=4"

BAD_INPUTS = [
    # --- 1. config values that used to be accepted
    Row(dry("train.lr=0"), "train.lr=0.0 must be positive"),
    Row(dry("train.lr=-1e-3"), "train.lr=-0.001"),
    Row(dry("train.lr=nan"), "train.lr=nan is not a finite number"),
    Row(dry("train.lr=1e400"), "train.lr=inf is not a finite number"),
    Row(dry("train.lr=.inf"), "train.lr=inf"),
    Row(dry("train.betas=[0.9,1.0]"), "train.betas[1]=1.0 must be in [0, 1)"),
    Row(dry("train.betas=[-0.1,0.999]"), "train.betas[0]"),
    Row(dry("train.betas=[0.9,.nan]"), "train.betas[1]=nan"),
    Row(dry("train.weight_decay=-0.1"), "train.weight_decay=-0.1 must be at least 0"),
    Row(dry("train.grad_clip=-1"), "train.grad_clip=-1.0 must be positive"),
    Row(dry("train.grad_clip=0"), "or null for no clipping"),
    Row(dry("train.ema_decay=1"), "train.ema_decay=1.0 must be in [0, 1)"),
    Row(dry("train.ema_decay=-0.5"), "train.ema_decay"),
    Row(dry("train.warmup_steps=-1"), "train.warmup_steps=-1"),
    Row(dry("train.min_lr_ratio=-0.1"), "train.min_lr_ratio=-0.1 must be in [0, 1]"),
    Row(dry("train.min_lr_ratio=2"), "fraction of train.lr"),
    Row(dry("train.log_every=0"), "train.log_every=0 must be at least 1"),
    Row(dry("train.ckpt_every=-1"), "train.ckpt_every=-1"),
    Row(dry("train.sample_every=-5"), "train.sample_every=-5"),
    Row(dry("train.threads=-2"), "train.threads=-2"),
    Row(dry("train.threads=0"), "train.threads=0 must be at least 1, or null"),
    Row(dry("train.device=gpu"), "train.device='gpu' is not a device; use one of: auto | cpu | cuda | cuda:N"),
    Row(dry("train.device=cuda:x"), "train.device='cuda:x'"),
    Row(dry("train.device=tpu"), "train.device='tpu'"),
    Row(dry("train.aux_weights.balance=-1"), "train.aux_weights.balance=-1.0"),
    Row(dry(MOE, "model.moe.expert_ratio=0"), "model.moe.expert_ratio=0.0 must be positive"),
    Row(dry(MOE, "model.moe.shared_ratio=-1"), "model.moe.shared_ratio=-1.0"),
    Row(dry(MOE, "model.moe.num_shared=-1"), "model.moe.num_shared=-1"),
    Row(dry(MOE, "model.moe.router.scale=.nan"), "model.moe.router.scale=nan"),
    Row(dry(MOE, "model.moe.router.scale=0"), "model.moe.router.scale=0.0 must be positive"),
    Row(dry(MOE, "model.moe.router.bias_update_rate=-0.1"), "model.moe.router.bias_update_rate"),
    Row(dry(MOE, "model.moe.router.prototype_std=-1"), "model.moe.router.prototype_std"),
    Row(dry("model.mlp_ratio=0"), "model.mlp_ratio=0.0 must be positive"),
    Row(dry("model.num_classes=0"), "model.num_classes=0"),
    Row(dry("model.class_dropout=.nan"), "model.class_dropout=nan"),
    Row(dry("sample.steps=0"), "sample.steps=0 must be at least 1"),
    Row(dry("sample.per_class=0"), "sample.per_class=0"),
    Row(dry("sample.cfg_scale=nan"), "sample.cfg_scale=nan"),
    Row(dry("sample.cfg_scale=-.inf"), "sample.cfg_scale=-inf"),
    Row(dry("sample.cfg_interval=[0.8,0.2]"), "sample.cfg_interval=[0.8, 0.2] must be [t_lo, t_hi] with 0 <= t_lo"),
    Row(dry("sample.cfg_interval=[-0.5,0.5]"), "sample.cfg_interval"),
    Row(dry("sample.cfg_interval=[0,.nan]"), "sample.cfg_interval[1]=nan"),
    Row(dry("objective.logit_std=0"), "objective.logit_std=0.0 must be positive"),
    Row(dry("objective.logit_mean=.nan"), "objective.logit_mean=nan"),
    Row(dry("objective.t_shift=-1"), "objective.t_shift=-1.0"),
    Row(dry("objective.beta_start=0"), "objective.beta_start=0.0 must be in (0, 1)"),
    Row(dry("objective.beta_end=1.5"), "objective.beta_end=1.5"),
    Row(dry("objective.beta_start=0.05"), "must not exceed objective.beta_end=0.02"),
    Row(dry("data.image_size=0"), "data.image_size=0"),
    # --- 2. --set values that are not YAML, keys with empty parts; config files that are not YAML text
    Row(dry("train.lr=[1,"), "override 'train.lr=[1,': the value '[1,' is not valid YAML"),
    Row(dry("train.lr={"), "values are read as YAML"),
    Row(dry(".lr=1"), "override '.lr=1': the key '.lr' has an empty part"),
    Row(dry("train..lr=1"), "'train..lr' has an empty part"),
    Row(dry("train.lr"), "must look like key.path=value"),
    Row("train --dry-run -c {binary_yaml}", "{binary_yaml} is not a UTF-8 text file"),
    Row("train --dry-run -c {latin1_yaml}", "{latin1_yaml} is not a UTF-8 text file"),
    Row("train --dry-run -c {folder_yaml}", "{folder_yaml} is a folder"),
    Row("train --dry-run -c {nul_yaml}", "{nul_yaml} is not valid YAML"),
    Row("train --dry-run -c {broken_yaml}", "{broken_yaml} is not valid YAML"),
    Row("train --dry-run -c {overflow_yaml}", "train.lr=inf is not a finite number"),
    Row("train --dry-run -c {nan_yaml}", "sample.cfg_scale=nan"),
    Row("train --dry-run -c {tmp}/missing.yaml", "{tmp}/missing.yaml does not exist"),
    # --- 3./4. outputs that cannot be written, refused before the model is loaded
    Row("sample --run {run} --out {PROC}/grid.png", "--out: cannot write {PROC}"),
    Row("sample --run {run} --out {file}/grid.png", "--out: {file} is a file"),
    Row("sample --run {run} --out {tmp}", "--out: {tmp} is a folder"),
    Row("sample --run {blocked}", "{blocked}/samples is a file"),
    Row("sample --run {run} --npz {PROC}/x", "--npz: cannot write {PROC}"),
    Row("sample --run {run} --npz {file}/x", "--npz: {file} is a file"),
    Row("sample --run {run} --npz {folder_npz}", "--npz: {folder_npz} is a folder"),
    Row("sample --run {run} --set sample.steps=0", "sample.steps=0"),
    Row("sample --run {run} --set sample.cfg_interval=[1,0]", "sample.cfg_interval=[1.0, 0.0]"),
    Row("sample --run {run} --set train.device=tpu", "train.device='tpu'"),
    Row("sample --run {run} --set sample.steps=[", "not valid YAML"),
    Row("eval {eval_run} --n 10 --out {PROC}", "output folder (--out): cannot write {PROC}"),
    Row("eval {eval_run} --n 10 --out {file}", "{file} is a file where a folder is needed"),
    Row("eval {eval_run} --n 10 --out {file}/sub", "cannot write {file}/sub"),
    Row("eval {blocked} --n 10", "{blocked}/eval is a file"),
    Row("eval {eval_run} --n 10 --set sample.cfg_scale=nan", "sample.cfg_scale=nan"),
    Row("eval {eval_run} --n 10 --set train.device=gpu", "train.device='gpu'"),
    Row("diagnose {run} --out {PROC}", "--out: cannot write {PROC}"),
    Row("diagnose {run} --out {file}", "--out: {file} is a file"),
    Row("diagnose {blocked}", "{blocked}/diagnostics is a file"),
    Row("convert {dense} --out {PROC}/new --set " + MOE, "cannot write {PROC}"),
    Row("convert {dense} --out {file}/new --set " + MOE, "--out {file}/new: its parent folder: {file} is a file"),
    Row("convert {dense} --out {run} --set " + MOE, "{run} already exists"),
    # --- 5. sources that are not checkpoints
    Row("convert {rand_safetensors} --out {tmp}/new", "{rand_safetensors} is not a readable .safetensors file"),
    Row("convert {text_safetensors} --out {tmp}/new", "{text_safetensors} is not a readable .safetensors"),
    Row("convert {empty_safetensors} --out {tmp}/new", "{empty_safetensors} is not a readable .safetensors"),
    Row("convert {text_pt} --out {tmp}/new", "{text_pt} is not a readable PyTorch checkpoint"),
    Row("convert {rand_pt} --out {tmp}/new", "{rand_pt} cannot be read as a tensor-only checkpoint"),
    Row("convert {list_pt} --out {tmp}/new", "{list_pt} does not hold a state dict (name -> tensor) but a list"),
    Row("convert {mixed_pt} --out {tmp}/new", "{mixed_pt} does not hold a state dict (name -> tensor) but a dict "
                                              "whose 'note' is a str"),
    Row("convert {file} --out {tmp}/new", "is neither a moedit run/checkpoint directory"),
    Row("convert {dense} --out {tmp}/new --set " + MOE + " model.moe.expert_ratio=0", "model.moe.expert_ratio=0.0"),
    Row("convert {dense} --out {tmp}/new --set model.moe.num_experts=[4,", "not valid YAML"),
]


def fill(text: str, paths: dict[str, str]) -> str:
    """{name} fields replaced by their paths (not str.format: the rows also hold YAML braces)."""
    for name, value in {"PROC": PROC, **paths}.items():
        text = text.replace("{" + name + "}", value)
    return text


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, out: str, err: str, command: str, expected: str) -> None:
    assert code == 2, f"exit {code}; stderr: {err!r}"
    assert "Traceback" not in out + err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert lines[0].startswith(f"moedit {command}: error: "), lines[0]
    assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"


@pytest.fixture
def no_model(monkeypatch):
    """Building a model during a bad-input row means a check came too late."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the bad input was refused")

    monkeypatch.setattr("moedit.models.build_model", refuse)


def test_the_table_is_large():
    """A guard against rows lost in a merge, and against a duplicated row hiding a missing case."""
    assert len(BAD_INPUTS) >= 90 and len({row.argv for row in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("row", BAD_INPUTS, ids=str)
def test_bad_input_gives_one_clear_line(row: Row, paths, capsys, no_model):
    argv = fill(row.argv, paths).split()
    code, out, err = run_cli(argv, capsys)
    assert_one_error_line(code, out, err, argv[0], fill(row.expected, paths))
    assert not Path(paths["tmp"], "new").exists()  # convert rows: nothing written


def test_bad_inputs_leave_no_output_behind(paths):
    leftovers = [p.name for p in Path(paths["tmp"]).iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not Path(paths["run"], "eval").exists()


# ----------------------------------------------------------------------------- a full disk at write time


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/full")


def test_full_disk_while_writing_sample_npz(paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(np, "savez_compressed", _disk_full)
    code, out, err = run_cli(["sample", "--run", paths["run"], "--out", str(tmp_path / "g.png"),
                              "--npz", str(tmp_path / "x")], capsys)
    assert_one_error_line(code, out, err, "sample", "cannot read or write /data/full: No space left on device; "
                                                    "the disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]  # no partial .npz, no temporary file


def test_full_disk_while_writing_the_diagnostics(paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moedit.diagnostics.report.plot_load_heatmaps", _disk_full)
    code, out, err = run_cli(["diagnose", paths["run"], "--out", str(tmp_path / "diag")], capsys)
    assert_one_error_line(code, out, err, "diagnose", "the disk is full")


def test_full_disk_while_writing_a_conversion(paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moedit.convert.workflow.save_yaml", _disk_full)
    out_dir = tmp_path / "moe"
    code, out, err = run_cli(["convert", paths["dense"], "--out", str(out_dir), "--set", MOE], capsys)
    assert_one_error_line(code, out, err, "convert", "the disk is full")
    assert list(tmp_path.iterdir()) == []  # neither the run nor its temporary folder


# ----------------------------------------------------------------------------- what is written is what is printed


def test_sample_npz_path_printed_is_the_file_written(paths, tmp_path, capsys):
    code = cli_main(["sample", "--run", paths["run"], "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "x")])
    printed = capsys.readouterr().out
    assert code == 0 and f"and {tmp_path / 'x.npz'}" in printed
    with np.load(tmp_path / "x.npz") as f:
        assert f["images"].shape == (10, 1, 28, 28) and list(f["labels"]) == list(range(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "x.npz"]


# ----------------------------------------------------------------------------- damaged caches are recomputed


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zip_without_feats(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("other.npy", b"")


def _other_shape(path: Path) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, feats=np.zeros((3, 5), np.float32))


DAMAGES = {
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(2048)),
    "text": lambda p: p.write_text("not an npz\n"),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": _truncate,
    "zip without feats": _zip_without_feats,
    "other shape": _other_shape,
}


def _reference_context(cache_dir: Path, notes: list[str]):
    """An EvalContext scoring against 40 synthetic 28x28 images standing in for MNIST's test split."""
    from moedit.config import DataConfig
    from moedit.data import build_dataset
    from moedit.eval.evaluate import EvalContext

    ctx = EvalContext(torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                      DataConfig(name="mnist", split="test"), 0, torch.device("cpu"), cache_dir, notes.append)
    images = build_dataset(DataConfig(name="synthetic", image_size=28)).images_NCHW[:40]
    ctx.reference = type("Reference", (), {"images_NCHW": images})()  # cached_property: the instance wins
    return ctx


@pytest.mark.parametrize("damage", DAMAGES, ids=str)
def test_damaged_reference_feature_cache_is_recomputed(damage, tmp_path):
    clean_notes: list[str] = []
    clean = _reference_context(tmp_path, clean_notes).real_lenet
    (cache_file,) = (tmp_path / "eval_reference").glob("*.npz")
    assert clean.shape == (40, 128) and clean_notes == []
    DAMAGES[damage](cache_file)
    notes: list[str] = []
    again = _reference_context(tmp_path, notes).real_lenet
    assert torch.equal(again, clean)
    assert len(notes) == 1 and str(cache_file) in notes[0] and "computing the features again" in notes[0]
    with np.load(cache_file) as f:  # replaced by a good cache
        assert np.array_equal(f["feats"], clean.numpy())
    later: list[str] = []
    assert torch.equal(_reference_context(tmp_path, later).real_lenet, clean) and later == []


def test_unwritable_reference_feature_cache_only_costs_time(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder goes\n")
    notes: list[str] = []
    feats = _reference_context(blocker, notes).real_lenet
    assert feats.shape == (40, 128) and len(notes) == 1 and "not cached" in notes[0]


def test_truncated_mnist_cache_counts_as_damaged(tmp_path):
    from moedit.data.mnist import _read_cache

    path = tmp_path / "mnist.npz"
    with open(path, "wb") as fh:
        np.savez(fh, train_x=np.zeros((4, 28, 28), np.uint8), train_y=np.zeros(4, np.int64))
    assert _read_cache(path, "train") is not None
    _truncate(path)
    assert _read_cache(path, "train") is None
