"""Metrics of generated video clips of one-digit Moving MNIST, and `moedit eval` on a video run (docs/VIDEO.md,
"Evaluation"). No FVD / I3D weights can be had offline, so the clips are scored frame by frame with the
shipped MNIST LeNet (eval/features.py) plus two video-specific checks a frame metric cannot make: does the
digit keep its identity over the clip, and does it move as the data's digits move.

Scope: per-frame FD-LeNet and KID are defined for any Moving MNIST clips (two-digit clips too: the crop is
then centred between the digits and the numbers compare crops with crops). Per-frame class accuracy,
identity stability and motion are defined for ONE digit per clip: a two-digit clip has a pair label (55
classes) the 10-class LeNet cannot predict, and one centroid cannot follow two digits. Asking for them on
`data.digits: 2` is refused (EvalError) before anything is sampled or scored.

Clips x_BCTHW: C = 1, square S×S frames (S ≥ 28), uint8 or float in [−1, 1] (mapped to uint8 by the
pixel convention of data/base.py first, so a float clip and its uint8 cache score the same). Notation: p_{b,t}
(i, j) = u / 255 ∈ [0, 1] is pixel (row i, column j) of frame t of clip b.

**Digit crop** (what the LeNet sees). MNIST digits are centred in their 28×28 field by centre of mass,
which sits at (14, 14) in pixel-index coordinates (measured on MNIST test: 14.00 ± 0.29 per axis), so

    w(i, j)    = max(p(i, j) − τ, 0)                       τ = INK_FLOOR = 0.2
    c = (c_r, c_c) = Σ_ij w(i, j) · (i, j) / Σ_ij w(i, j)    the frame's intensity centroid
    o          = clamp(round(c − 14), 0, S − 28)            per axis (round half to even)
    crop       = frame[o_r : o_r + 28, o_c : o_c + 28]

τ keeps a faint background (a model's near-black is rarely 0) from pulling the centroid to the canvas
centre: at 64×64, a background of 3/255 everywhere outweighs a digit's ink in the plain centroid. A
frame with no ink above τ gets the centred window (o = (S − 28) // 2 per axis) and the centroid
o + 14. A digit drawn at offset o on a black canvas is cropped back exactly when its own centroid lies
within 0.5 px of (14, 14) (tested). Vectorised: one gather per chunk of frames, no loop per frame.

**Per-frame distribution and accuracy** (features φ, logits z of every frame's crop; M = B·T rows):
- fd_lenet_frames: FD(φ of all generated frames, φ of all reference frames), the Fréchet distance of
  eval/metrics.py. Like fd_lenet, moedit-internal and biased upwards at small M: compare at equal N, T.
- kid_lenet_frames: KID (cubic kernel k of eval/metrics.py) on the same features, mean ± std over 100
  draws of m = min(B, B_ref, max(2, 1000 // T)) clips from each set. The frames of one clip are near
  copies of one digit, so the plain unbiased MMD² (which only leaves out i = j) is biased upwards by the
  same-clip pairs (measured: 4.1 ± 1.1 for 200 train vs 300 test clips, 32×32, 8 frames); the estimate leaves
  out every within-set pair of frames of the same clip:
      MMD² = Σ_{clip(i)≠clip(j)} k(xᵢ, xⱼ) / (m(m−1)T²) + (the same for y) − 2 Σ_{i,j} k(xᵢ, yⱼ) / (mT)²
  which is unbiased for clips drawn independently (T = 1: eval/metrics.py's KID).
- class_accuracy_frames: (1 / BT) Σ_{b,t} [argmax z_{b,t} = y_b], y_b the label clip b was drawn for;
  class_accuracy_frames_per_class the same per label. One digit only.

**Identity stability** (one digit): with ŷ_{b,t} = argmax z_{b,t} and n_{b,k} = #{t : ŷ_{b,t} = k},
- identity_stability = (1/B) Σ_b [ŷ_{b,0} = ŷ_{b,1} = … = ŷ_{b,T−1}]   (the share of clips that never change digit)
- identity_agreement = (1/B) Σ_b max_k n_{b,k} / T                    (the mean share of frames agreeing with the clip's modal digit)
A clip of frames of different digits scores low; a static clip scores 1 (read motion for that).

**Motion** (one digit; s = the data's speed in px/frame, from the dataset's meta `speed` = data.speed;
hi = S − 28): the centroid trajectory c_{b,t}, steps d_{b,t} = c_{b,t+1} − c_{b,t} (t < T − 1), box
positions q_{b,t} = c_{b,t} − 14, and F the elastic fold of the data generator (data/moving_mnist.py:
F(x) = m if m ≤ hi else 2·hi − m, m = x mod 2·hi, per axis) that turns free motion into bouncing motion:
- motion_mean_displacement = mean_{b,t} |d_{b,t}|; motion_speed_ratio = that / s (1 for the data, up to
  rounding and bounces; 0 for a static clip).
- motion_speed_match = mean_{b,t} [ | |d_{b,t}| − s | ≤ 1 px ]: steps at the data's speed (a real digit's
  drawn position is rounded to whole pixels, so a step is off s by up to ~0.7 px, more at a bounce).
- motion_prediction_error = mean_{b, 1≤t≤T−2} |c_{b,t+1} − (F(q_{b,t} + d_{b,t−1}) + 14)|: how far frame
  t+1 is from where constant velocity with the data's bounces puts it (0 for a static clip and ≈ 0 for
  noise, which do not move: read it with the speed).
- motion_consistency (the headline) = mean_{b, 1≤t≤T−2} [ | |d_{b,t}| − s | ≤ 1 px  and  that prediction
  error ≤ 1.5 px ]: the share of frames that continue the clip's motion at the data's speed. A static
  clip (no step at speed s), noise (its centroid jitters by < 1 px) and shuffled frames (steps of random
  size and direction) all score low; docs/VIDEO.md lists what real clips, shuffled, static and noise
  clips read (studies/video_metrics_calibration.py). Needs T ≥ 3 (else null), s > 0 for the ratio.
"""

from __future__ import annotations

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
from moedit.codecs import IdentityCodec
from moedit.config import Config, DataConfig
from moedit.data import VideoDataset, build_dataset, default_cache_dir, to_uint8
from moedit.data.moving_mnist import DIGIT_NAMES, PAIR_NAMES
from moedit.eval import evaluate as ev
from moedit.eval import features as fx
from moedit.eval import metrics as mx
from moedit.eval.sampling import EvalError, EvalSettings, sample_for_eval
from moedit.utils.files import atomic_write_text
from moedit.utils.npz import save_npz
from moedit.utils.video import save_contact_sheet, save_gif

DIGIT = 28  # the classifier's field
DIGIT_CENTRE = 14.0  # MNIST's centre of mass inside its 28×28 field, pixel-index coordinates
INK_FLOOR = 0.2  # τ: pixel values (in [0, 1]) up to this count as background for the centroid
SPEED_TOLERANCE = 1.0  # px: a step "at the data's speed"
PREDICTION_TOLERANCE = 1.5  # px: a frame "where constant velocity with bounces puts it"
CROP_CHUNK = 2048  # frames per vectorised centroid + gather
CROP_VERSION = 1  # part of the reference-feature cache key: bump when the crop definition changes
DATASETS = ("moving_mnist",)  # the video data with a domain classifier (MNIST digits)
VIDEO_DEFAULT_METRICS = ("fd_lenet_frames", "kid_lenet_frames", "class_accuracy_frames", "identity_stability",
                         "motion")
ONE_DIGIT_METRICS = ("class_accuracy_frames", "identity_stability", "motion")
TWO_DIGIT_DEFAULT_METRICS = ("fd_lenet_frames", "kid_lenet_frames")
CONTACT_PER_CLASS = 2  # clips per class on the contact sheet and in the GIF
CONTACT_NAME, GIF_NAME = "contact_sheet.png", "samples.gif"
# keys of eval.json that decide a video evaluation's numbers besides EvalSettings and evaluate.SCORING_KEYS
VIDEO_SCORING_KEYS = ("reference_data", "crop")


# ----------------------------------------------------------------------------- crops


def as_frames(clips: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (B, T, S, S) from clips (B, 1, T, S, S) (uint8, or float in [−1, 1]); refuses other shapes."""
    x = torch.as_tensor(clips)
    if x.ndim != 5 or x.shape[1] != 1 or x.shape[3] != x.shape[4] or x.shape[3] < DIGIT:
        raise ValueError(f"video metrics take grey clips (B, 1, T, S, S) with square frames of S >= {DIGIT} "
                         f"(one-channel Moving MNIST), got shape {tuple(x.shape)}")
    return to_uint8(x)[:, 0]


def frame_centroids(frames_MHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids_M2 float64 (row, col), inked_M bool) of uint8 frames: the centroid of max(p − τ, 0)
    (module docstring); a frame with no ink above τ gets the centre of the centred window."""
    m, h, w = frames_MHW.shape
    p = frames_MHW.to(torch.float64) / 255.0
    wt = (p - INK_FLOOR).clamp(min=0.0)
    mass_M = wt.sum((1, 2))
    rows = (wt.sum(2) * torch.arange(h, dtype=torch.float64)).sum(1)
    cols = (wt.sum(1) * torch.arange(w, dtype=torch.float64)).sum(1)
    inked_M = mass_M > 0
    safe = torch.where(inked_M, mass_M, torch.ones_like(mass_M))
    c_M2 = torch.stack([rows / safe, cols / safe], 1)
    blank = torch.tensor([(h - DIGIT) // 2 + DIGIT_CENTRE, (w - DIGIT) // 2 + DIGIT_CENTRE], dtype=torch.float64)
    return torch.where(inked_M[:, None], c_M2, blank), inked_M


def crop_offsets(centroids_M2: torch.Tensor, size: int) -> torch.Tensor:
    """int64 (M, 2) top-left corners o = clamp(round(c − 14), 0, S − 28) of the 28×28 windows."""
    return torch.round(centroids_M2 - DIGIT_CENTRE).clamp(0, size - DIGIT).to(torch.int64)


def gather_windows(frames_MHW: torch.Tensor, offsets_M2: torch.Tensor) -> torch.Tensor:
    """(M, 28, 28): frame m's window at offsets_M2[m], by one advanced-indexing gather."""
    ar = torch.arange(DIGIT)
    rows_M28 = offsets_M2[:, :1] + ar  # (M, 28)
    cols_M28 = offsets_M2[:, 1:] + ar
    return frames_MHW[torch.arange(len(frames_MHW))[:, None, None], rows_M28[:, :, None], cols_M28[:, None, :]]


def digit_crops(clips: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops uint8 (B, T, 28, 28), centroids float64 (B, T, 2)) of clips (B, 1, T, S, S): every frame's
    28×28 window centred on its intensity centroid (module docstring), CROP_CHUNK frames at a time."""
    frames_BTHW = as_frames(clips)
    b, t, s, _ = frames_BTHW.shape
    frames_MHW = frames_BTHW.reshape(b * t, s, s)
    crops, cents = [], []
    for start in range(0, len(frames_MHW), CROP_CHUNK):
        chunk = frames_MHW[start : start + CROP_CHUNK]
        c_M2, _ = frame_centroids(chunk)
        crops.append(gather_windows(chunk, crop_offsets(c_M2, s)))
        cents.append(c_M2)
    if not crops:
        return torch.zeros(b, t, DIGIT, DIGIT, dtype=torch.uint8), torch.zeros(b, t, 2, dtype=torch.float64)
    return torch.cat(crops).reshape(b, t, DIGIT, DIGIT), torch.cat(cents).reshape(b, t, 2)


@dataclass(frozen=True)
class ClipFeatures:
    """LeNet's view of B clips of T frames: rows of feats / logits are frames, clip-major (row b·T + t)."""

    feats_MD: torch.Tensor
    logits_MK: torch.Tensor
    centroids_BT2: torch.Tensor

    @property
    def pred_BT(self) -> torch.Tensor:
        b, t = self.centroids_BT2.shape[:2]
        return self.logits_MK.argmax(1).reshape(b, t)


def clip_features(classifier: fx.LeNetClassifier, clips: torch.Tensor | np.ndarray) -> ClipFeatures:
    crops_BT, cents_BT2 = digit_crops(clips)
    b, t = crops_BT.shape[:2]
    feats_MD, logits_MK = fx.extract(classifier, crops_BT.reshape(b * t, 1, DIGIT, DIGIT))
    return ClipFeatures(feats_MD, logits_MK, cents_BT2)


# ----------------------------------------------------------------------------- clip metrics


def _mmd2_clips(x_MTD: torch.Tensor, y_NTD: torch.Tensor) -> torch.Tensor:
    """MMD² of frames with the within-set pairs of the same clip left out (module docstring, KID)."""
    def within(z_NTD: torch.Tensor) -> torch.Tensor:
        n, t, d = z_NTD.shape
        k = mx.polynomial_kernel(z_NTD.reshape(n * t, d), z_NTD.reshape(n * t, d))
        same_clip = k.reshape(n, t, n, t).diagonal(dim1=0, dim2=2).sum()  # the n blocks of t×t pairs
        return (k.sum() - same_clip) / (n * (n - 1) * t * t)

    cross = mx.polynomial_kernel(x_MTD.flatten(0, 1), y_NTD.flatten(0, 1)).mean()
    return within(x_MTD) + within(y_NTD) - 2.0 * cross


def clip_kid(fake_BTD: torch.Tensor, real_RTD: torch.Tensor, subsets: int = 100, subset_frames: int = 1000,
             seed: int = 0) -> dict:
    """Per-frame KID of clips: mean and std (ddof 0) over `subsets` draws of m clips from each set (m clips of
    T frames ≈ subset_frames frames, at least 2 clips), of the MMD² estimate whose within-set sums skip
    pairs of frames of the same clip (module docstring)."""
    a = torch.as_tensor(fake_BTD, dtype=torch.float64)
    b = torch.as_tensor(real_RTD, dtype=torch.float64)
    if a.ndim != 3 or b.ndim != 3 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"clip features must be (B, T, D) with one D, got {tuple(a.shape)} and {tuple(b.shape)}")
    m = min(len(a), len(b), max(2, subset_frames // max(a.shape[1], b.shape[1])))
    if m < 2:
        raise ValueError(f"per-frame KID needs at least 2 clips in each set, got {len(a)} and {len(b)}")
    gen = torch.Generator().manual_seed(seed)
    est = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        ia = torch.randperm(len(a), generator=gen)[:m]
        ib = torch.randperm(len(b), generator=gen)[:m]
        est[s] = _mmd2_clips(a[ia], b[ib])
    return {"mean": float(est.mean()), "std": float(est.std(correction=0)), "subsets": subsets,
            "subset_size": m * a.shape[1], "subset_clips": m}


def frame_class_accuracy(logits_MK: torch.Tensor, labels_B: torch.Tensor, frames: int) -> tuple[float, list[float]]:
    """(top-1 over all frames against their clip's label, the same per label 0..max)."""
    labels_M = torch.as_tensor(labels_B).long().repeat_interleave(frames)
    hit_M = logits_MK.argmax(1) == labels_M
    per_class = [float(hit_M[labels_M == c].double().mean()) for c in range(int(labels_M.max()) + 1)]
    return mx.class_accuracy(logits_MK, labels_M), per_class


def identity_stability(pred_BT: torch.Tensor, num_classes: int = fx.NUM_CLASSES) -> dict:
    """identity_stability (share of clips with one predicted digit in every frame) and identity_agreement
    (mean share of frames agreeing with the clip's modal prediction)."""
    pred_BT = torch.as_tensor(pred_BT).long()
    if pred_BT.ndim != 2 or pred_BT.shape[1] < 1 or len(pred_BT) < 1:
        raise ValueError(f"predictions must be (B, T) with B, T >= 1, got {tuple(pred_BT.shape)}")
    counts_BK = torch.nn.functional.one_hot(pred_BT, num_classes).sum(1)
    return {"identity_stability": float((pred_BT == pred_BT[:, :1]).all(1).double().mean()),
            "identity_agreement": float((counts_BK.max(1).values.double() / pred_BT.shape[1]).mean())}


def fold(x: torch.Tensor, hi: float) -> torch.Tensor:
    """The generator's bounce: x folded into [0, hi] with period 2·hi (hi = 0: always 0)."""
    if hi <= 0:
        return torch.zeros_like(x)
    m = torch.remainder(x, 2.0 * hi)
    return torch.where(m <= hi, m, 2.0 * hi - m)


def motion(centroids_BT2: torch.Tensor, speed: float, size: int) -> dict:
    """The motion_* numbers of centroid trajectories (B, T, 2) on an S×S canvas with the data's speed s
    (module docstring). Entries that need more frames (or s > 0) are None."""
    c = torch.as_tensor(centroids_BT2, dtype=torch.float64)
    if c.ndim != 3 or c.shape[-1] != 2 or len(c) < 1:
        raise ValueError(f"centroids must be (B, T, 2) with B >= 1, got {tuple(c.shape)}")
    speed = float(speed)
    out = {"motion_speed": speed, "motion_mean_displacement": None, "motion_speed_ratio": None,
           "motion_speed_match": None, "motion_prediction_error": None, "motion_consistency": None,
           "motion_steps": 0}
    if c.shape[1] < 2:
        return out
    d_BS2 = c[:, 1:] - c[:, :-1]
    step_BS = d_BS2.norm(dim=-1)
    at_speed_BS = (step_BS - speed).abs() <= SPEED_TOLERANCE
    mean = float(step_BS.mean())
    out.update(motion_mean_displacement=mean, motion_speed_ratio=mean / speed if speed > 0 else None,
               motion_speed_match=float(at_speed_BS.double().mean()), motion_steps=int(step_BS.numel()))
    if c.shape[1] >= 3:
        q_BT2 = c - DIGIT_CENTRE
        pred_BS2 = fold(q_BT2[:, 1:-1] + d_BS2[:, :-1], float(size - DIGIT)) + DIGIT_CENTRE  # frame t+1, t = 1..T-2
        err_BS = (c[:, 2:] - pred_BS2).norm(dim=-1)
        ok_BS = at_speed_BS[:, 1:] & (err_BS <= PREDICTION_TOLERANCE)
        out.update(motion_prediction_error=float(err_BS.mean()), motion_consistency=float(ok_BS.double().mean()))
    return out


# ----------------------------------------------------------------------------- scoring


def num_classes_of(data: DataConfig) -> int:
    return len(DIGIT_NAMES) if data.digits == 1 else len(PAIR_NAMES)


def default_metrics(data: DataConfig) -> tuple[str, ...]:
    return VIDEO_DEFAULT_METRICS if data.digits == 1 else TWO_DIGIT_DEFAULT_METRICS


def check_video_metrics(names: Sequence[str], data: DataConfig) -> None:
    """Refuse unknown names, and the one-digit metrics on two-digit data, before any work."""
    if not names:
        raise EvalError(f"no metric asked for; a video run's metrics are: {', '.join(VIDEO_METRICS)}")
    for name in names:
        if name not in VIDEO_METRICS:
            hint = " (the image metrics score images; a video run is scored per frame)" if name in ev.METRICS else ""
            raise EvalError(f"unknown video metric {name!r}{hint}; choose from: {', '.join(VIDEO_METRICS)}")
        if name in ONE_DIGIT_METRICS and data.digits != 1:
            raise EvalError(f"metric {name!r} is defined for one-digit Moving MNIST (data.digits: 1): a two-digit clip "
                            f"has a pair label the 10-class LeNet cannot predict and two trajectories one centroid "
                            f"cannot follow; with data.digits={data.digits} ask for: "
                            f"{', '.join(TWO_DIGIT_DEFAULT_METRICS)}")


@dataclass
class VideoEvalContext:
    """What a video metric function sees; the expensive parts are computed on first use and shared."""

    clips_NCTHW: torch.Tensor  # uint8 (N, 1, T, S, S), the generated clips
    labels_N: torch.Tensor  # int64, the label each was drawn for
    data: DataConfig  # the reference: moving_mnist at the run's frames / canvas / digits / speed, split
    seed: int
    device: torch.device
    cache_dir: Path
    log: Callable[[str], None] = field(default=lambda msg: print(f"note: {msg}", file=sys.stderr))

    @cached_property
    def reference(self) -> VideoDataset:
        return build_dataset(self.data)

    @cached_property
    def classifier(self) -> fx.LeNetClassifier:
        return fx.load_feature_classifier("mnist", self.device)

    @cached_property
    def fake(self) -> ClipFeatures:
        return clip_features(self.classifier, self.clips_NCTHW)

    @property
    def frames(self) -> int:
        return int(self.clips_NCTHW.shape[2])

    @property
    def speed(self) -> float:
        meta = self.reference.meta
        return float(meta["speed"]) if "speed" in meta else float(self.data.speed)

    @cached_property
    def real_feats(self) -> torch.Tensor:
        """φ of every frame's crop of the reference split, cached per clips + crop definition + weights."""
        clips = self.reference.clips_NCTHW.contiguous().numpy()
        n = clips.shape[0] * clips.shape[2]
        key = (f"{self.data.name}_{self.data.split}_{hashlib.sha256(clips.tobytes()).hexdigest()[:16]}"
               f"_crop{CROP_VERSION}_lenet-{ev.classifier_sha256('mnist')[:16]}.npz")
        path = self.cache_dir / "eval_reference" / key
        cached = ev.read_reference_cache(path, n, self.log)
        if cached is not None:
            return cached
        feats = clip_features(self.classifier, self.reference.clips_NCTHW).feats_MD
        try:
            save_npz(path, feats=feats.numpy())
        except OSError as exc:
            self.log(f"reference features not cached ({exc}); they are computed again next time")
        return feats


def _fd_frames(ctx: VideoEvalContext) -> dict:
    fake, real = ctx.fake.feats_MD, ctx.real_feats
    return {"fd_lenet_frames": mx.frechet_distance(*mx.feature_stats(fake), *mx.feature_stats(real)),
            "fd_lenet_frames_n_fake": len(fake), "fd_lenet_frames_n_ref": len(real)}


def _kid_frames(ctx: VideoEvalContext) -> dict:
    ref = ctx.reference
    fake_BTD = ctx.fake.feats_MD.reshape(len(ctx.clips_NCTHW), ctx.frames, -1)
    real_RTD = ctx.real_feats.reshape(len(ref), ref.frames, -1)
    return {"kid_lenet_frames": clip_kid(fake_BTD, real_RTD, ev.KID_SUBSETS, ev.KID_SUBSET_SIZE, seed=ctx.seed)}


def _class_accuracy_frames(ctx: VideoEvalContext) -> dict:
    acc, per_class = frame_class_accuracy(ctx.fake.logits_MK, ctx.labels_N, ctx.frames)
    return {"class_accuracy_frames": acc, "class_accuracy_frames_per_class": per_class}


def _identity(ctx: VideoEvalContext) -> dict:
    return identity_stability(ctx.fake.pred_BT)


def _motion(ctx: VideoEvalContext) -> dict:
    return motion(ctx.fake.centroids_BT2, ctx.speed, int(ctx.clips_NCTHW.shape[-1]))


VIDEO_METRICS: dict[str, Callable[[VideoEvalContext], dict]] = {
    "fd_lenet_frames": _fd_frames,
    "kid_lenet_frames": _kid_frames,
    "class_accuracy_frames": _class_accuracy_frames,
    "identity_stability": _identity,
    "motion": _motion,
}


def _score(ctx: VideoEvalContext, metrics: Sequence[str], earlier: dict) -> dict:
    scores = dict(earlier)
    for name in metrics:
        scores.update(VIDEO_METRICS[name](ctx))
    return scores


def score_clips(clips_NCTHW: torch.Tensor, labels_N: torch.Tensor, data: DataConfig, *,
                metrics: Sequence[str] | None = None, seed: int = 0, device: str | torch.device = "cpu",
                cache_dir: str | Path | None = None, reference: VideoDataset | None = None) -> dict:
    """The video metrics of any uint8 clips (labels: the class each stands for) against the split `data` names
    (or `reference`, a VideoDataset already built from `data`), by the code `moedit eval` scores samples with."""
    metrics = default_metrics(data) if metrics is None else metrics
    check_video_metrics(metrics, data)
    ctx = VideoEvalContext(torch.as_tensor(clips_NCTHW), torch.as_tensor(labels_N), data, seed, torch.device(device),
                           Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if reference is not None:
        ctx.reference = reference  # cached_property: the instance attribute wins
    return _score(ctx, metrics, {})


# ----------------------------------------------------------------------------- `moedit eval` on a video run


def is_video_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> bool:
    """Whether the run's model makes clips (model.frames > 1); a run that cannot be read answers False, and
    the image path then reports why exactly as before."""
    try:
        cfg, _ = runs.run_configs(run_dir, overrides, allowed=runs.EVAL_OVERRIDES, command="evaluation")
    except Exception:  # noqa: BLE001 -- re-raised by the image path's own checks
        return False
    return cfg.model.frames > 1


def _check_video_scorable(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    if d.name not in DATASETS:
        raise EvalError(f"the video run trained on data.name={d.name!r}, which has no domain classifier; video "
                        f"evaluation supports: {', '.join(DATASETS)} (docs/VIDEO.md, Evaluation)")
    classes = num_classes_of(d)
    if m.in_channels != 1 or m.image_size < DIGIT or m.num_classes < classes:
        raise EvalError(f"Moving MNIST clips are 1x{m.frames}xSxS with S >= {DIGIT} and {classes} classes, but the model "
                        f"makes {m.in_channels}x{m.frames}x{m.image_size}x{m.image_size} clips of {m.num_classes} classes")


def _reference_data(cfg: Config, split: str) -> DataConfig:
    """The run's own data definition (frames, canvas, digits, speed, clips, MNIST path), at `split`."""
    return replace(cfg.data, split=split, frames=cfg.model.frames,
                   image_size=cfg.data.image_size if cfg.data.image_size is not None else cfg.model.image_size)


def evaluate_video_run(
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
    """evaluate_run for a video run (model.frames > 1): n class-balanced clips, seeded and cached as images are
    (eval/sampling.py), scored by the video metrics against the dataset's `split`; writes OUT/eval.json,
    OUT/samples.npz (uint8 clips N×C×T×H×W), OUT/contact_sheet.png (one row per clip, the first two clips
    of each class) and OUT/samples.gif (the same clips, one class per row). Returns eval.json's content."""
    from moedit.device import autocast_dtype, resolve_device
    from moedit.objectives import build_objective

    log = log or (lambda msg: None)
    if batch_size < 1 or seed < 0:
        raise EvalError(f"batch_size must be at least 1 and seed at least 0, got {batch_size} and {seed}")
    if split not in ev.REFERENCE_SPLITS:
        raise EvalError(f"split={split!r} is not a reference split; choose one of: {', '.join(ev.REFERENCE_SPLITS)}")
    ev._check_overrides(overrides)
    cfg, _ = runs.run_configs(run_dir, overrides, allowed=runs.EVAL_OVERRIDES, command="evaluation")
    _check_video_scorable(cfg)
    ref_data = _reference_data(cfg, split)
    metrics = default_metrics(ref_data) if metrics is None else list(metrics)
    check_video_metrics(metrics, ref_data)
    num_classes = num_classes_of(ref_data)
    run = runs.open_run(run_dir, checkpoint, overrides, allowed=runs.EVAL_OVERRIDES, command="evaluation")
    with ev._intra_op_threads(run.cfg.train.threads):
        n = ev._balanced_n(n, num_classes, round_n, log)
        ev._check_out_writable(run, out_dir)
        device = resolve_device(run.cfg.train.device)
        amp_dtype = autocast_dtype(run.cfg.train.precision, device)
        weights = "raw" if raw or not run.cfg.sample.use_ema else "ema"
        model, weights_sha = ev.load_model(run, weights, device)
        settings = replace(ev._settings(run, n, seed, batch_size, weights, weights_sha, device, amp_dtype,
                                        IdentityCodec()), num_classes=num_classes)
        out = Path(out_dir) if out_dir is not None else ev.default_out_dir(run, settings)
        record = {**_describe(run, settings, split, device, ref_data), "out_dir": str(out)}
        earlier = _earlier_record(out, record, settings)  # refuses before anything in `out` is touched
        clips_N, labels_N = sample_for_eval(model, build_objective(run.cfg.objective), settings, out / ev.CACHE_NAME,
                                            device, amp_dtype, progress=progress, on_batch=on_batch, log=log)
        ctx = VideoEvalContext(torch.from_numpy(clips_N), torch.from_numpy(labels_N), ref_data, seed, device,
                               Path(cache_dir) if cache_dir is not None else default_cache_dir(), log)
        scores = _score(ctx, metrics, earlier.get("metrics", {}))
        ref = ctx.reference
        record.update(n_reference=len(ref), n_reference_frames=len(ref) * ref.frames, metrics=scores)
    per_class = min(CONTACT_PER_CLASS, n // num_classes)
    shown = ev._grid_images(clips_N, num_classes, per_class)
    save_contact_sheet(shown, out / CONTACT_NAME)
    save_gif(shown, out / GIF_NAME, nrow=per_class)
    atomic_write_text(out / ev.EVAL_JSON, json.dumps(record, indent=1) + "\n")
    return record


def _describe(run: runs.Run, settings: EvalSettings, split: str, device: torch.device, ref: DataConfig) -> dict:
    return {
        "dataset": ref.name, "split": split, **settings.as_dict(),
        "labels": "class-balanced: sample i has label i mod num_classes",
        "checkpoint": str(run.path), "run_dir": str(run.run_dir), "device": str(device),
        "torch_version": torch.__version__, "moedit_version": __version__,
        "classifier": "lenet_mnist", "classifier_sha256": ev.classifier_sha256("mnist"),
        "classifier_test_accuracy": fx.read_record("mnist").get("test_accuracy"),
        "reference_data": {"frames": ref.frames, "image_size": ref.image_size, "digits": ref.digits,
                           "speed": ref.speed, "clips": ref.clips, "path": ref.path},
        "crop": {"size": DIGIT, "digit_centre": DIGIT_CENTRE, "ink_floor": INK_FLOOR, "version": CROP_VERSION},
        "files": {"samples": ev.CACHE_NAME, "contact_sheet": CONTACT_NAME, "gif": GIF_NAME},
    }


def _earlier_record(out: Path, record: dict, settings: EvalSettings) -> dict:
    """As evaluate._earlier_record, and the reference data and the crop must match too."""
    earlier = ev._earlier_record(out, record, settings)
    diffs = [f"{k}: there {earlier.get(k)!r}, now {record.get(k)!r}" for k in VIDEO_SCORING_KEYS
             if earlier and earlier.get(k) != record.get(k)]
    if diffs:
        raise EvalError(f"{out} already holds a different evaluation:\n  " + "\n  ".join(diffs)
                        + "\nNothing was changed. Pass another output folder (--out), or delete that one to redo it.")
    return earlier
