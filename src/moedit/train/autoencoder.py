"""`moedit autoencoder train`: train moedit's KL autoencoder (codecs/autoencoder_net.py) on an image dataset.

Per batch x ∈ [-1, 1]:   L = rec(x̂, x) + kl_weight · KL(q(z|x) ‖ N(0, I))

with x̂ decoded from one posterior sample, rec = mean |x̂ − x| (`l1`, LDM's choice) or mean (x̂ − x)²
(`mse`), and the KL averaged per latent element. A small KL weight keeps the latent near a unit Gaussian
without blurring the reconstructions (LDM's KL-f8 uses a tiny weight for the same reason). AdamW with a
linear warm-up and a cosine decay, an EMA of the weights (exported), batches in a seeded order.

The run directory (train.out_dir):
    config.yaml, metrics.jsonl                 the resolved config; loss, rec, kl, lr, img/s per log step
    checkpoints/step_*/                        model, EMA and optimizer + RNG state (exact resume, --resume)
    autoencoder.safetensors, autoencoder.json  written at the end: the EMA weights and their record, with the
                                               latent shift/scale measured here (codec.path=<this folder>)
The CLI then measures reconstruction quality (eval/reconstruction.py) and adds it to the record.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moedit.codecs.autoencoder import export_autoencoder
from moedit.codecs.autoencoder_net import AutoencoderSpec, KLAutoencoder, kl_to_standard_normal
from moedit.config import (ConfigError, DataConfig, apply_overrides, dataclass_from_dict, load_yaml, save_yaml,
                           to_dict)
from moedit.data import ImageDataset, build_dataset
from moedit.device import resolve_device
from moedit.train import checkpoint as ckpt
from moedit.train.batches import BatchStream
from moedit.train.ema import EMA
from moedit.train.metrics import MetricsWriter
from moedit.train.optim import lr_at, param_groups, set_lr
from moedit.train.trainer import TrainingError
from moedit.utils.files import atomic_write_text, describe_os_error, ensure_writable_dir
from moedit.utils.lock import LOCK_NAME, DirLock, LockedError


@dataclass(kw_only=True)
class AutoencoderTrainConfig:
    out_dir: str = "runs/autoencoder"
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # constant | cosine (to min_lr_ratio·lr at the last step)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    loss: str = "l1"  # l1 | mse: the reconstruction term
    kl_weight: float = 1e-4
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    stat_images: int = 4096  # training images the exported latent shift / scale are measured on
    device: str = "auto"
    threads: int | None = None
    log_every: int = 50
    ckpt_every: int = 1000  # 0 = only at the end
    keep_last: int = 2


@dataclass(kw_only=True)
class AutoencoderEvalConfig:
    """Reconstruction quality measured after training (eval/reconstruction.py)."""

    split: str = "test"
    images: int = 10_000  # at most this many images of the split are reconstructed


@dataclass(kw_only=True)
class AutoencoderRunConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderSpec = field(default_factory=AutoencoderSpec)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    eval: AutoencoderEvalConfig = field(default_factory=AutoencoderEvalConfig)


def load_autoencoder_config(path: str | Path | None, overrides: list[str] | None = None) -> AutoencoderRunConfig:
    data = apply_overrides(load_yaml(path) if path is not None else {}, overrides or [])
    cfg = dataclass_from_dict(AutoencoderRunConfig, data)
    validate_autoencoder_config(cfg)
    return cfg


def validate_autoencoder_config(cfg: AutoencoderRunConfig) -> None:
    from moedit.data import DATASETS

    problems = [f"model.{p}" for p in cfg.model.problems()]
    t = cfg.train
    for key in ("steps", "batch_size", "log_every", "keep_last", "stat_images"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key}={getattr(t, key)} must be at least 1")
    for key, valid in (("loss", ("l1", "mse")), ("lr_schedule", ("constant", "cosine"))):
        if getattr(t, key) not in valid:
            problems.append(f"train.{key}={getattr(t, key)!r} is not valid; choose one of: {', '.join(valid)}")
    if t.lr <= 0 or t.kl_weight < 0 or t.weight_decay < 0 or t.warmup_steps < 0 or t.ckpt_every < 0:
        problems.append("train.lr must be positive and train.kl_weight, weight_decay, warmup_steps, ckpt_every "
                        "at least 0")
    if not 0 <= t.ema_decay < 1 or not 0 <= t.min_lr_ratio <= 1:
        problems.append("train.ema_decay must be in [0, 1) and train.min_lr_ratio in [0, 1]")
    if t.grad_clip is not None and t.grad_clip <= 0:
        problems.append(f"train.grad_clip={t.grad_clip} must be positive, or null for no clipping")
    if cfg.data.name not in DATASETS:
        problems.append(f"data.name={cfg.data.name!r} is not a dataset; choose one of: {', '.join(DATASETS)}")
    if cfg.eval.images < 1:
        problems.append(f"eval.images={cfg.eval.images} must be at least 1")
    if problems:
        raise ConfigError("; ".join(problems))


def check_data_fits(spec: AutoencoderSpec, dataset: ImageDataset) -> None:
    if dataset.channels != spec.in_channels:
        raise ConfigError(f"{dataset.name} has {dataset.channels}-channel images but model.in_channels="
                          f"{spec.in_channels}; set model.in_channels={dataset.channels}")
    if dataset.image_size % spec.factor:
        raise ConfigError(f"{dataset.name}'s side {dataset.image_size} is not a multiple of the downsampling factor "
                          f"{spec.factor} (2^(len(model.channels)−1)); set data.image_size to a multiple of "
                          f"{spec.factor} or use fewer levels in model.channels")


def reconstruction_loss(kind: str, recon_BCHW: torch.Tensor, x_BCHW: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(recon_BCHW, x_BCHW) if kind == "l1" else F.mse_loss(recon_BCHW, x_BCHW)


@torch.no_grad()
def latent_statistics(model: KLAutoencoder, dataset: ImageDataset, count: int, seed: int,
                      device: torch.device, batch_size: int = 256) -> dict:
    """shift = mean and scale = 1/std of posterior samples z = μ + σ·ε over `count` training images."""
    gen = torch.Generator().manual_seed(seed)
    idx_N = torch.randperm(len(dataset), generator=gen)[: min(count, len(dataset))]
    total, total_sq, n, sigma_sum = 0.0, 0.0, 0, 0.0
    for start in range(0, len(idx_N), batch_size):
        x_BCHW, _ = dataset.batch(idx_N[start : start + batch_size])
        mean_BCHW, logvar_BCHW = model.moments(x_BCHW.to(device))
        std_BCHW = torch.exp(0.5 * logvar_BCHW)
        z_BCHW = mean_BCHW + std_BCHW * torch.randn(mean_BCHW.shape, generator=gen).to(device)
        total += float(z_BCHW.double().sum())
        total_sq += float(z_BCHW.double().pow(2).sum())
        sigma_sum += float(std_BCHW.double().sum())
        n += z_BCHW.numel()
    mean = total / n
    std = math.sqrt(max(total_sq / n - mean**2, 1e-12))
    return {"shift": mean, "scale": 1.0 / std, "latent_std": std, "posterior_sigma_mean": sigma_sum / n,
            "images": len(idx_N)}


class AutoencoderTrainer:
    """`AutoencoderTrainer(cfg).train()`; holds train.out_dir's lock from construction until train() returns."""

    def __init__(self, cfg: AutoencoderRunConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        tc = cfg.train
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.run_dir = Path(tc.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.lock = DirLock(self.run_dir, "moedit autoencoder train", log=tqdm.write)
        created = not self.run_dir.exists()
        try:
            ensure_writable_dir(self.run_dir, "train.out_dir")
            self.lock.acquire()
        except LockedError as exc:
            raise TrainingError(f"{exc} (or set train.out_dir to a new directory)") from None
        try:
            self._build(resume)
        except BaseException:
            self._abandon_start(created)
            raise

    def _abandon_start(self, created: bool) -> None:
        """A start that failed (bad data, a refused resume) leaves no empty run folder behind."""
        if created and {p.name for p in self.run_dir.iterdir()} == {LOCK_NAME}:
            (self.run_dir / LOCK_NAME).unlink()
            self.lock.release()
            self.run_dir.rmdir()
        self.lock.release()

    def _build(self, resume: bool) -> None:
        cfg, tc = self.cfg, self.cfg.train
        for action in ckpt.sweep_partial(self.ckpt_root):
            tqdm.write(f"note: {self.ckpt_root}: {action}")
        existing = ckpt.list_checkpoints(self.ckpt_root)
        if existing and not resume:
            raise TrainingError(f"{self.run_dir} already holds an autoencoder run (latest checkpoint "
                                f"{existing[-1].name}); pass --resume to continue it, or set train.out_dir to a new "
                                "directory. Nothing was changed.")
        if resume and not existing:
            raise TrainingError(f"--resume: {self.run_dir} has no checkpoint to continue from; drop --resume to "
                                "start a new run there. Nothing was changed.")
        torch.manual_seed(cfg.seed)
        self.dataset = build_dataset(cfg.data)
        check_data_fits(cfg.model, self.dataset)
        self.model = KLAutoencoder(cfg.model).to(self.device)
        self.ema = EMA(self.model, tc.ema_decay)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr)
        self.batches = BatchStream(self.dataset, tc.batch_size, cfg.seed)
        self.start_step = self._load(existing[-1]) if existing else 0
        save_yaml(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(self.run_dir, start_step=self.start_step, log=tqdm.write)

    def _load(self, path: Path) -> int:
        state = ckpt.read_state(path)
        ckpt.check_model_config(path, state, to_dict(self.cfg.model))
        ckpt.load_weights(self.model, path, "model.safetensors")
        ckpt.load_weights(self.ema.model, path, "ema.safetensors")
        ckpt.load_trainer_state(path, self.optimizer, state)
        self.ema.updates = state.get("ema_updates", 0)
        return state["step"]

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        tc = self.cfg.train
        set_lr(self.optimizer, lr_at(step, tc))
        x_BCHW, _ = self.batches.get(step)
        x_BCHW = x_BCHW.to(self.device)
        recon_BCHW, mean_BCHW, logvar_BCHW = self.model(x_BCHW)
        rec = reconstruction_loss(tc.loss, recon_BCHW, x_BCHW)
        kl = kl_to_standard_normal(mean_BCHW, logvar_BCHW)
        loss = rec + tc.kl_weight * kl
        loss.backward()
        logs = {"loss": loss.detach(), "rec": rec.detach(), "kl": kl.detach()}
        if tc.grad_clip is not None:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip).detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return logs

    def _check_finite(self, loss_sum: torch.Tensor, done: int) -> None:
        """Before anything is logged or saved: non-finite weights are never written."""
        if not bool(torch.isfinite(loss_sum)):
            raise TrainingError(f"the autoencoder loss became non-finite by step {done}; lower train.lr (now "
                                f"{self.cfg.train.lr}) and start again from the last checkpoint with --resume")

    def save(self, step: int) -> None:
        try:
            ckpt.save_checkpoint(self.ckpt_root, step, self.model, self.ema.model, self.optimizer,
                                 to_dict(self.cfg.model), {"ema_updates": self.ema.updates}, self.cfg.train.keep_last)
        except OSError as exc:
            raise TrainingError(f"checkpoint step {step} was not written: {describe_os_error(exc)}; the earlier "
                                "checkpoints are intact: run again with --resume") from exc

    def train(self) -> dict:
        try:
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> dict:
        tc = self.cfg.train
        self.model.train()
        bar = tqdm(range(self.start_step, tc.steps), initial=self.start_step, total=tc.steps, desc="autoencoder",
                   disable=not self.progress, dynamic_ncols=True)
        window: dict[str, torch.Tensor] = {}
        window_n, t0, seen = 0, time.perf_counter(), 0
        for step in bar:
            for key, value in self.train_step(step).items():  # device-side sums, read once per log step
                window[key] = window.get(key, 0.0) + value
            window_n, seen, done = window_n + 1, seen + tc.batch_size, step + 1
            if done % tc.log_every == 0 or done == tc.steps or (tc.ckpt_every and done % tc.ckpt_every == 0):
                self._check_finite(window["loss"], done)
            if done % tc.log_every == 0 or done == tc.steps:
                elapsed = time.perf_counter() - t0
                avg = {k: float(v) / window_n for k, v in window.items()}
                self.metrics.write(done, {**avg, "lr": lr_at(step, tc), "img_per_s": seen / elapsed,
                                          "elapsed_s": elapsed})
                bar.set_postfix(rec=f"{avg['rec']:.4f}", kl=f"{avg['kl']:.3g}")
                window, window_n = {}, 0
            if tc.ckpt_every and done % tc.ckpt_every == 0 and done != tc.steps:
                self.save(done)
        bar.close()
        wall = time.perf_counter() - t0
        if self.start_step < tc.steps:
            self.save(tc.steps)
        self.metrics.close()
        return self._export(wall, seen)

    def _export(self, wall: float, seen: int) -> dict:
        """The EMA weights with their latent statistics: what codec.path=<run> reads."""
        stats = latent_statistics(self.ema.model, self.dataset, self.cfg.train.stat_images, self.cfg.seed,
                                  self.device)
        extra = {"data": to_dict(self.cfg.data), "train": to_dict(self.cfg.train), "seed": self.cfg.seed,
                 "latent_statistics": stats, "steps": self.cfg.train.steps}
        record = export_autoencoder(self.run_dir, self.ema.model, stats["scale"], stats["shift"], extra)
        summary = {"steps": self.cfg.train.steps, "start_step": self.start_step, "train_wall_s": wall,
                   "img_per_s": seen / wall if wall > 0 else math.nan, "record": str(record), **stats}
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary
