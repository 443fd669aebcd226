"""The training loop. One step reads top to bottom:

    x0, y  = next batch
    loss   = objective.loss(model, x0, y)                    # diffusion loss, the model knows no diffusion
    aux    = model.aux_losses()                              # unweighted, by name, summed over MoE layers
    total  = loss + Σ_name train.aux_weights[name] · aux[name]   # the one place aux losses are weighted
    total.backward(); clip; optimizer.step(); router hooks (aux-free bias); EMA update

Around it: warm-up, gradient accumulation, autocast (bf16 on CUDA, float32 on CPU), parameter storage
(train.param_dtype; train/bf16.py) with the bf16 lost-update monitor (diagnostics/precision.py), DDP under
torchrun, a progress bar, metrics.jsonl, periodic sample grids and atomic checkpoints with exact resume.

The run directory is held with an exclusive lock (utils/lock.py) from before it is read until the last
file is written, so a second writer is refused instead of mixing its files into this run's; under
torchrun every rank's RNG state is checkpointed and restored by rank, and the run ends with a barrier
(`moedit train` then shuts the process group down) so no rank exits before rank 0 has written its final files.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moedit.codecs import Codec, IdentityCodec, build_codec
from moedit.config import Config, ConfigError, save_yaml, to_dict
from moedit.data import build_dataset, latent_format, open_latents, read_header
from moedit.device import autocast_dtype, check_backend_runs, resolve_device
from moedit.distributed import setup as dist_setup
from moedit.distributed.setup import all_reduce_sum, init_distributed
from moedit.generate import save_class_grid
from moedit.models import build_model
from moedit.moe.routers import router_class
from moedit.objectives import build_objective
from moedit.train import checkpoint as ckpt
from moedit.diagnostics.monitor import build_monitor
from moedit.diagnostics.precision import PrecisionMonitor
from moedit.train.batches import BatchStream
from moedit.train.bf16 import store_parameters
from moedit.train.ema import EMA
from moedit.train.layout import Layout
from moedit.train.metrics import MetricsWriter, routing_metrics, summary_writer_class
from moedit.train.optim import build_optimizer, lr_at, set_lr
from moedit.utils.files import PathError, atomic_write_text, describe_os_error, ensure_writable_dir
from moedit.utils.lock import LOCK_NAME, DirLock, LockedError


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


def check_data_fits_model(cfg: Config, dataset, codec: Codec | None = None) -> None:
    m = cfg.model
    codec = codec or IdentityCodec()
    codec.check_pixels(dataset.channels, dataset.image_size)
    channels, size = codec.latent_shape(dataset.channels, dataset.image_size)
    if (channels, size) != (m.in_channels, m.image_size):
        through = "" if isinstance(codec, IdentityCodec) else f", {channels}x{size}x{size} through the codec"
        raise ConfigError(
            f"data {dataset.name} has {dataset.channels}x{dataset.image_size}x{dataset.image_size} images{through} "
            f"but the model expects {m.in_channels}x{m.image_size}x{m.image_size}; set model.in_channels="
            f"{channels} model.image_size={size}" + (" (or data.image_size to resize)" if not through else "")
        )
    frames = getattr(dataset, "frames", 1)  # video datasets have T frames per clip, images (and latents) 1
    if frames != m.frames:
        what = f"clips of {frames} frames" if frames > 1 else "images (one frame each)"
        raise ConfigError(f"data {dataset.name} has {what} but model.frames={m.frames}; set model.frames={frames}"
                          + (" (a video model trains on clips: data.name=moving_mnist or video_folder)"
                             if frames == 1 else ""))
    if dataset.num_classes > m.num_classes:
        raise ConfigError(f"data {dataset.name} has {dataset.num_classes} classes but model.num_classes="
                          f"{m.num_classes}; set model.num_classes={dataset.num_classes}")
    if len(dataset) < cfg.train.batch_size:
        raise ConfigError(f"data {dataset.name} has {len(dataset)} images, fewer than train.batch_size="
                          f"{cfg.train.batch_size}; lower train.batch_size or add data")


class Trainer:
    """`Trainer(cfg).train()`. `resume`: continue train.out_dir from its latest checkpoint (an error when
    it has none, unless `start_if_empty`, which starts a fresh run there instead). Holds the run
    directory's lock from construction until `train()` returns (or `close()`)."""

    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True, start_if_empty: bool = False):
        self.cfg, self.progress = cfg, progress
        tc = cfg.train
        self.device = resolve_device(tc.device)
        self.dist = init_distributed(self.device.type, cfg.parallel.timeout_s)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        check_backend_runs(cfg, self.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.amp_dtype = autocast_dtype(tc.precision, self.device)
        self.layout = Layout(cfg, self.dist, self.device, self.amp_dtype)  # DDP or FSDP2 (+ EP) (train/layout.py)
        self.run_dir = Path(tc.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.lock = DirLock(self.run_dir, "moedit train", log=tqdm.write)
        self._created_run_dir = not self.run_dir.exists()
        self._open_run_dir()  # writable, locked, swept: before any data is loaded
        try:
            self._build(resume, start_if_empty)
        except BaseException:
            self._abandon_start()
            raise

    def _abandon_start(self) -> None:
        """A start that failed leaves the directory as it found it: a folder this start created, holding
        nothing but its lock file, is removed again (while still locked, so no other writer is in it)."""
        if self._created_run_dir and self.lock.held and {p.name for p in self.run_dir.iterdir()} == {LOCK_NAME}:
            (self.run_dir / LOCK_NAME).unlink()
            self.lock.release()
            self.run_dir.rmdir()
        self.lock.release()

    def _open_run_dir(self) -> None:
        """Rank 0 checks that train.out_dir is writable, takes its lock and clears what a killed save left;
        every rank learns whether that worked, so a refused start ends all ranks with the reason."""
        error: Exception | None = None
        if self.dist.is_main:
            try:
                ensure_writable_dir(self.run_dir, "train.out_dir")
                if self.cfg.train.tensorboard:
                    summary_writer_class()  # a missing package is said now, not after the data loaded
                self.lock.acquire()
                for action in ckpt.sweep_partial(self.ckpt_root):
                    tqdm.write(f"note: {self.ckpt_root}: {action}")
            except LockedError as exc:
                error = TrainingError(f"{exc} (the other process may be `moedit train --resume` of this run: "
                                      "let it finish, or set train.out_dir to a new directory)")
            except (PathError, ConfigError) as exc:
                error = exc
            except OSError as exc:
                error = PathError(f"train.out_dir: {describe_os_error(exc)}")
        if not dist_setup.all_ranks_agree(error is None, self.device):
            self.lock.release()
            raise error or TrainingError(f"rank 0 could not open {self.run_dir}; its message says why")

    def _build(self, resume: bool, start_if_empty: bool) -> None:
        cfg, tc = self.cfg, self.cfg.train
        if cfg.model.moe is not None and self.dist.is_main:
            for warning in router_class(cfg.model.moe.router.name).config_warnings(cfg.model.moe):
                tqdm.write(f"warning: {warning}")
        if self.dist.is_main:
            for note in self.layout.ignored:
                tqdm.write(f"note: {note}")
            if self.dist.enabled:
                tqdm.write(f"parallel: {self.layout.describe()}")
        latest = self._check_run_dir(resume, start_if_empty)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.codec, self.dataset = self._open_data()
        self.model = build_model(cfg.model).to(self.device)
        store_parameters(self.model, tc, self.amp_dtype)  # train.param_dtype (docs/PRECISION.md)
        self.layout.prepare(self.model)  # meshes; rank 0's initial weights on every rank when sharded
        self.ema = EMA(self.model, tc.ema_decay)
        self.layout.apply(self.model, training=True)  # activation checkpointing, experts split, FSDP2 units
        self.layout.apply(self.ema.model, training=False)  # sharded like the model, so its update is local
        self.optimizer = build_optimizer(self.model, tc, self.device, seed=cfg.seed)
        self.precision_monitor = PrecisionMonitor(self.model, tc.bf16_monitor_every,
                                                  getattr(self.optimizer, "intended_value", None))
        self.objective = build_objective(cfg.objective)
        self.batches = BatchStream(self.dataset, tc.batch_size, cfg.seed, tc.grad_accum, self.dist.rank, self.dist.world,
                                   workers=cfg.data.workers)
        self.start_step = self._load(latest) if latest is not None else 0
        self._first_bad: torch.Tensor | None = None  # first step with a non-finite loss, kept on the device
        self._aux_names_checked = False
        self.step_model = self.layout.wrap(self.model)
        if self.dist.is_main:
            save_yaml(cfg, self.run_dir / "config.yaml")  # only now: the checkpoint and config fit
        self.metrics = MetricsWriter(self.run_dir, tc.tensorboard, enabled=self.dist.is_main, start_step=self.start_step)
        self.routing_monitor = build_monitor(  # RUN/routing/ (docs/DIAGNOSTICS.md); a no-op for dense models
            cfg, self.model, self.run_dir, self.start_step, is_main=self.dist.is_main,
            reduce_fn=all_reduce_sum if self.dist.enabled else None, log=tqdm.write)

    def _open_data(self) -> tuple[Codec, object]:
        """The codec and the training data: images (encoded by the codec each step) or latents already
        encoded (a `moedit extract` store, or a peer's folder), which the codec only decodes for samples."""
        cfg = self.cfg
        fmt = latent_format(cfg.data) if cfg.data.name == "latents" else None
        store = read_header(Path(cfg.data.path).expanduser()) if fmt == "moedit" else None
        if store is not None:
            self._adopt_store_codec(store)
        elif fmt is not None:
            self._check_peer_codec(fmt)
        codec = build_codec(cfg.codec).to(self.device)
        cfg.codec.scale, cfg.codec.shift = (codec.scale, codec.shift) if cfg.codec.name != "identity" else (None, None)
        if fmt is None:
            dataset = build_dataset(cfg.data)
            check_data_fits_model(cfg, dataset, codec)
            return codec, dataset
        if store is not None:
            self._check_store_codec(store, codec)
        dataset = open_latents(cfg.data, codec.scale, codec.shift, cfg.codec.posterior)
        check_data_fits_model(cfg, dataset)
        return codec, dataset

    def _adopt_store_codec(self, store: dict) -> None:
        """A latent store names its codec: a config that names none (identity) takes it, so the run directory
        records the decoder its samples need."""
        if self.cfg.codec.name == "identity":
            self.cfg.codec.name, self.cfg.codec.path = store["codec"]["name"], store["codec"]["path"]
            if self.dist.is_main:
                tqdm.write(f"note: codec from the latent store: {store['codec']['describe']}")

    def _check_peer_codec(self, fmt: str) -> None:
        """A peer's latents name no VAE: the config must, and only the user can know it is the right one."""
        if self.cfg.codec.name == "identity":
            raise TrainingError(f"data.latent_format={fmt}: these latents need the VAE they were extracted with to "
                                "decode samples; set codec.name=diffusers codec.path=<that VAE's folder> (SD-VAE "
                                "sd-vae-ft-ema or -mse for the DiT-family caches)")
        if self.dist.is_main:
            tqdm.write(f"note: {fmt} latents record no VAE; samples are decoded with codec.path={self.cfg.codec.path}, "
                       "which must be the VAE they were extracted with")

    def _check_store_codec(self, store: dict, codec: Codec) -> None:
        if codec.identity() != store["codec_identity"]:
            raise TrainingError(f"the latent store {self.cfg.data.path} was extracted with {store['codec']['describe']} "
                                f"({store['codec_identity']}) but codec is {codec.describe()} "
                                f"({codec.identity()}); its latents mean nothing to this decoder. Set codec.path "
                                "to the store's autoencoder, or extract the data again with this codec")

    def _check_run_dir(self, resume: bool, start_if_empty: bool) -> Path | None:
        existing = ckpt.list_checkpoints(self.ckpt_root)
        if existing and not resume:
            raise TrainingError(
                f"{self.run_dir} already holds a run (latest checkpoint {existing[-1].name}); pass --resume to "
                "continue it, or set train.out_dir to a new directory. Nothing was changed."
            )
        if resume and not existing and not start_if_empty:
            raise TrainingError(
                f"--resume: {self.run_dir} has no checkpoint to continue from (checkpoints/step_* is missing); "
                "check train.out_dir, drop --resume to start a new run there, or pass --resume-or-start. "
                "Nothing was changed.")
        return existing[-1] if existing else None

    def _load(self, path: Path) -> int:
        state = ckpt.read_state(path)
        ckpt.check_model_config(path, state, to_dict(self.cfg.model))
        inexact = self.layout.load(path, state, self.model, self.ema.model, self.optimizer)
        if inexact is not None:  # other world size: a fresh stream per (seed, step, rank), never step 0's again
            torch.manual_seed((self.cfg.seed * 1_000_003 + state["step"]) * 4099 + self.dist.rank)
            if self.dist.is_main:
                tqdm.write(f"note: resuming {path.name}: {inexact}")
        self.ema.updates = state.get("ema_updates", 0)
        moved = self.batches.check_position(state.get("data_position"), state["step"])
        if moved and self.dist.is_main:
            tqdm.write(f"warning: resuming {path.name}: {moved}")
        saved = self._saved_config()
        self._check_same_codec(saved)
        self._note_older_aux_convention(saved)
        return state["step"]

    def _saved_config(self) -> dict:
        """The run's config.yaml as it was written by its last start ({} when unreadable)."""
        import yaml

        try:
            saved = yaml.safe_load((self.run_dir / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def _check_same_codec(self, saved: dict) -> None:
        """The model was trained on one codec's latents: resuming with another (or another scale) would mix
        two input spaces in one run. Only the folder may move."""
        before = saved.get("codec") or {"name": "identity"}
        now = to_dict(self.cfg.codec)
        differ = [k for k in ("name", "scale", "shift") if before.get(k) != now[k]]
        if differ:
            raise TrainingError(f"{self.run_dir} was trained with codec " + ", ".join(
                f"{k}={before.get(k)!r}" for k in differ) + " but this config has " + ", ".join(
                f"{k}={now[k]!r}" for k in differ) + "; resume with the run's codec settings (only codec.path may "
                "change), or start a new train.out_dir")

    def _note_older_aux_convention(self, saved: dict) -> None:
        """A run whose config.yaml predates `train.aux_over_layers` was trained with its auxiliary losses
        averaged over the MoE layers; continuing it with `peers` multiplies their effect by the layer count."""
        train = saved.get("train")
        layers = len(self.model.moe_layers())
        if (isinstance(train, dict) and "aux_over_layers" not in train and layers > 1
                and self.cfg.train.aux_over_layers == "peers" and self.dist.is_main):
            tqdm.write(f"warning: {self.run_dir} was trained before train.aux_over_layers existed, with its "
                       f"auxiliary losses averaged over the {layers} MoE layers; they are now summed (the papers' "
                       "convention). To continue it as it was trained, add --set train.aux_over_layers=mean")

    def save(self, step: int, final: bool = False) -> None:
        """Every rank hands rank 0 its RNG state (exact resume by rank); rank 0 writes a plain checkpoint,
        every rank its shards of a sharded one (`final`: with single-file weights too). A failed write (a
        full disk) leaves no partial directory and stops the run with the reason: the earlier checkpoints
        are intact."""
        rng_by_rank = dist_setup.gather_to_main(ckpt.rng_state())
        extra = {"ema_updates": self.ema.updates, "data_position": self.batches.position(step)}
        try:
            self.layout.save(self.ckpt_root, step, self.model, self.ema.model, self.optimizer,
                             to_dict(self.cfg.model), extra, rng_by_rank, final)
        except OSError as exc:
            raise TrainingError(f"checkpoint step {step} was not written: {describe_os_error(exc)}. "
                                f"{self._intact_checkpoint()}; then run again with --resume") from exc

    def _intact_checkpoint(self) -> str:
        latest = ckpt.list_checkpoints(self.ckpt_root)
        return f"the last checkpoint {latest[-1]} is intact" if latest else "no checkpoint was written"

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def weighted_aux(self, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ weight·aux: the single place where auxiliary losses enter the objective."""
        weights = self.cfg.train.aux_weights
        unweighted = [name for name in aux if name not in weights]
        if unweighted:
            raise ConfigError(f"the router emits auxiliary loss(es) {unweighted} with no weight; set "
                              + " ".join(f"train.aux_weights.{n}=<w>" for n in unweighted) + " (0 disables)")
        total = torch.zeros((), device=self.device)
        if not self._aux_names_checked:
            self._warn_unused_aux_weights(aux)
        for name, value in aux.items():
            total = total + weights[name] * value.float()
        return total

    def _warn_unused_aux_weights(self, aux: dict) -> None:
        """A weight under a name no loss has (a typo such as `balanse`) would silently do nothing: say so
        once, at the first step. Built-in names stay quiet: they are filled in for every run."""
        from moedit.config import default_aux_weights

        self._aux_names_checked = True
        built_in = default_aux_weights()
        unused = sorted(set(self.cfg.train.aux_weights) - set(built_in) - set(aux))
        if unused and self.dist.is_main:
            tqdm.write(f"warning: train.aux_weights has {unused}, but the model emits no loss of that name "
                       f"(it emits {sorted(aux) or 'none'}; built-in names: {sorted(built_in)}); "
                       "check the spelling")

    def _loss_and_aux(self, x0_BCHW: torch.Tensor, y_B: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """Diffusion loss, the unweighted aux losses combined over MoE layers, and each layer's (keyed
        `name/block<i>`, for the log), all from one (DDP-visible) forward."""
        captured: dict[str, dict] = {}

        def model_fn(*args, **kwargs) -> torch.Tensor:
            prediction, captured["aux"], captured["by_layer"] = self.step_model(*args, **kwargs)
            return prediction

        loss, _ = self.objective.loss(model_fn, x0_BCHW, y_B, pass_target=self.model.wants_target)
        return loss, captured["aux"], captured["by_layer"]

    def train_step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step with no host synchronisation: the logged values stay on the device (read
        once per log window by `train`), and a non-finite loss is remembered on the device as the first
        bad step (`check_finite` raises for it before anything is logged, sampled or saved)."""
        tc = self.cfg.train
        set_lr(self.optimizer, lr_at(step, tc))
        logs: dict[str, torch.Tensor] = {}
        for micro in range(tc.grad_accum):
            x0_BCHW, y_B = self.batches.get(step, micro)
            x0_BCHW, y_B = x0_BCHW.to(self.device, non_blocking=True), y_B.to(self.device, non_blocking=True)
            if not getattr(self.dataset, "is_latent", False):  # a latent store's batches are in it already
                x0_BCHW = self.codec.encode(x0_BCHW, sample=self.cfg.codec.posterior == "sample")  # the model's space
            with self._autocast():
                loss, aux, aux_by_layer = self._loss_and_aux(x0_BCHW, y_B)
                total = loss.float() + self.weighted_aux(aux)
            self._note_finite(step + 1, total.detach())  # 1-based, as in metrics.jsonl and checkpoint names
            (total / tc.grad_accum).backward()
            self.routing_monitor.observe_model(self.model)  # device-side counts only (docs/DIAGNOSTICS.md)
            logged = {"loss": loss, **{f"aux/{k}": v for k, v in {**aux, **aux_by_layer}.items()}}
            for name, value in logged.items():
                logs[name] = logs.get(name, 0.0) + value.detach().float() / tc.grad_accum
        self.layout.after_backward(self.model)  # expert gradients to the mean over ranks under ep > 1
        if tc.grad_clip is not None:
            logs["grad_norm"] = self.layout.clip_grad_norm(self.model, tc.grad_clip).detach()
        self.precision_monitor.before_step(step)  # snapshots the weights every bf16_monitor_every steps
        self.optimizer.step()
        self.precision_monitor.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step(all_reduce_sum if self.dist.enabled else None)
        self.ema.update(self.model)
        return logs

    def _note_finite(self, step: int, total: torch.Tensor) -> None:
        """Keep the first step whose loss was not finite, on the device (−1: none yet)."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=total.device)
        bad = ~torch.isfinite(total) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, torch.full_like(self._first_bad, step), self._first_bad)

    def check_finite(self) -> None:
        """Raise if a step since the start had a non-finite loss: before any log, sample or checkpoint, so
        no non-finite weights are ever written (the weights in memory may already hold NaN). Under torchrun
        the ranks agree on the first bad step, so all of them stop at the same point with the same message."""
        first_bad = -1 if self._first_bad is None else dist_setup.first_flagged_step(self._first_bad)
        if first_bad < 0:
            return
        raise TrainingError(
            f"loss became non-finite at step {first_bad}; {self._intact_checkpoint()}. Lower train.lr "
            f"(now {self.cfg.train.lr}), keep train.grad_clip set, or raise train.warmup_steps, then start again "
            "from that checkpoint with --resume (or a new train.out_dir)."
        )

    def write_samples(self, name: str) -> Path | None:
        model = self.layout.sampling_model(self.ema.model)  # every rank: gathers sharded EMA weights on rank 0
        if not self.dist.is_main:
            return None
        path = self.run_dir / "samples" / f"{name}.png"
        save_class_grid(model, self.objective, self.cfg.sample, self.cfg.model.num_classes,
                        self.device, path, amp_dtype=self.amp_dtype, codec=self.codec)
        return path

    def train(self) -> dict:
        """Train to train.steps, write the final checkpoint, grid and RUN/summary.json, release the run.
        On an error the lock is released too (the checkpoints written so far stay as they are)."""
        try:
            summary = self._train()
        except BaseException:
            self.lock.release()
            raise
        self.close()
        return summary

    def _train(self) -> dict:
        tc = self.cfg.train
        self.model.train()
        bar = tqdm(range(self.start_step, tc.steps), initial=self.start_step, total=tc.steps, desc="train",
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True)
        window: dict[str, torch.Tensor] = {}
        window_n, t0, seen = 0, time.perf_counter(), 0
        for step in bar:
            logs = self.train_step(step)
            seen += tc.batch_size * tc.grad_accum * self.dist.world
            for key, value in logs.items():  # device-side sums: the step stays free of host syncs
                window[key] = window.get(key, 0.0) + value
            window_n += 1
            done = step + 1
            self.routing_monitor.end_step(done)
            due = [tc.sample_every and done % tc.sample_every == 0 and done != tc.steps,
                   tc.ckpt_every and done % tc.ckpt_every == 0 and done != tc.steps]
            if done % tc.log_every == 0 or done == tc.steps or any(due):
                self.check_finite()
            if done % tc.log_every == 0 or done == tc.steps:
                names = list(window)
                values = torch.stack([window[k].float() for k in names]).div_(window_n).tolist()  # one transfer
                avg = dict(zip(names, values))
                elapsed = time.perf_counter() - t0
                avg.update(lr=lr_at(step, tc), img_per_s=seen / elapsed, elapsed_s=elapsed)
                avg.update(routing_metrics(self.model))
                avg.update(self.precision_monitor.read())
                self.metrics.write(done, avg)
                self.routing_monitor.flush()  # the one host transfer of the routing record per log step
                bar.set_postfix(loss=f"{avg['loss']:.4f}")
                window, window_n = {}, 0
            if due[0]:
                self.write_samples(f"step_{done:08d}")
            if due[1]:
                self.save(done)
        bar.close()
        self.batches.close()  # the data workers, if any, before sampling and the last checkpoint
        wall = time.perf_counter() - t0
        self.routing_monitor.close()  # last record, RUN/routing/summary.json, findings printed
        if self.start_step < tc.steps:  # a finished run resumed with nothing to do keeps its checkpoint
            self.save(tc.steps, final=True)
        grid = self.write_samples("final")
        self.metrics.close()
        summary = {"steps": tc.steps, "start_step": self.start_step, "train_wall_s": wall,
                   "img_per_s": seen / wall if wall > 0 else math.nan, "final_grid": str(grid) if grid else None}
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def close(self) -> None:
        """End of the run: every rank waits at a barrier until rank 0 has written its last file (ranks that
        exited early used to abort rank 0 in the middle of its final checkpoint), then the lock is
        released. The process group is the process owner's to shut down (`moedit train` does, last)."""
        dist_setup.barrier()
        self.lock.release()
