"""What each video metric reads for real, shuffled, static, mixed and noise clips of one-digit Moving MNIST:
the floor and the ceilings that a video model's `moedit eval` scores sit between (docs/VIDEO.md, Evaluation).

    .venv/bin/python studies/video_metrics_calibration.py --size 32 --frames 8     # the CPU-scale canvas
    .venv/bin/python studies/video_metrics_calibration.py --size 64 --frames 10    # the standard canvas

The reference is the test split (`--ref-clips` clips, default 2000 = moving_mnist's test split), exactly as
`moedit eval` scores a video run (moedit.eval.video.score_clips). The scored sets stand in for samples,
`--clips` each (default 500), built from train-split clips (other MNIST digits, other seed: disjoint
from the reference):
- real (train split): the clips with their labels (the score of a perfect model);
- shuffled frames: each clip's frames in a random order (never the identity), labels kept;
- static: each clip's frame 0 repeated T times, labels kept;
- mixed clips: frame t (t ≥ 1) of clip b taken from a random clip, frame 0 its own; label of frame 0;
- Gaussian noise: clamp(N(0, 1), −1, 1) per pixel (the range a sampler's output is clamped to), mapped to
  uint8, labels i mod 10;
- test split itself: the reference scored against itself (FD 0, KID ≈ 0).
Each run merges its rows, keyed by canvas and frames, into studies/results/video_metrics_calibration.json
and rewrites studies/results/video_metrics_calibration.md from all of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from moedit.config import DataConfig
from moedit.data import build_dataset
from moedit.eval.video import score_clips

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "studies" / "results" / "video_metrics_calibration"


def non_identity_perms(n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """(n, t) random permutations of range(t), none the identity (t >= 2)."""
    perms = torch.stack([torch.randperm(t, generator=gen) for _ in range(n)])
    ident = torch.arange(t)
    while t > 1 and (bad := (perms == ident).all(1)).any():
        perms[bad] = torch.stack([torch.randperm(t, generator=gen) for _ in range(int(bad.sum()))])
    return perms


def candidate_sets(train, n: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train), generator=gen)[:n]
    x, y = train.clips_NCTHW[pick], train.labels_N[pick]  # (n, 1, T, S, S)
    n, _, t = x.shape[:3]
    perms = non_identity_perms(n, t, gen)
    shuffled = torch.gather(x, 2, perms[:, None, :, None, None].expand_as(x))
    static = x[:, :, :1].expand_as(x).contiguous()
    sources = torch.stack([torch.arange(n)] + [torch.randint(0, n, (n,), generator=gen) for _ in range(t - 1)], 1)
    mixed = x[sources, :, torch.arange(t)[None, :]].permute(0, 2, 1, 3, 4).contiguous()  # (n, T, 1, S, S) -> NCTHW
    noise = ((torch.randn(x.shape, generator=gen).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return {"real (train split)": (x, y), "shuffled frames": (shuffled, y), "static (frame 0 repeated)": (static, y),
            "mixed clips (frame t from another clip)": (mixed, y), "Gaussian noise": (noise, torch.arange(n) % 10)}


def row(name: str, n: int, m: dict) -> dict:
    k = m["kid_lenet_frames"]
    return {"set": name, "clips": n, "fd": m["fd_lenet_frames"], "kid": k["mean"], "kid_std": k["std"],
            "accuracy": m["class_accuracy_frames"], "identity_stability": m["identity_stability"],
            "identity_agreement": m["identity_agreement"], "displacement": m["motion_mean_displacement"],
            "speed_ratio": m["motion_speed_ratio"], "speed_match": m["motion_speed_match"],
            "prediction_error": m["motion_prediction_error"], "consistency": m["motion_consistency"]}


def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown(results: dict) -> str:
    lines = []
    for key in sorted(results, key=lambda k: (results[k]["meta"]["size"], results[k]["meta"]["frames"])):
        meta, rows = results[key]["meta"], results[key]["rows"]
        lines += [f"**{meta['size']}×{meta['size']}, {meta['frames']} frames, speed {meta['speed']:g} px/frame** "
                  f"(reference: test split, {meta['ref_clips']:,} clips = {meta['ref_frames']:,} frames; "
                  f"`{meta['command']}`; {meta['device']}, torch {meta['torch']})", "",
                  "| clips scored | N | FD-LeNet/frame | KID/frame | class acc./frame | identity stab. | identity agr. "
                  "| mean step (px) | speed ratio | speed match | pred. error (px) | motion consistency |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['set']} | {r['clips']:,} | {r['fd']:.2f} | {r['kid']:.2f} ± {r['kid_std']:.2f} | "
                         f"{r['accuracy']:.3f} | {r['identity_stability']:.3f} | {r['identity_agreement']:.3f} | "
                         f"{_f(r['displacement'], '.2f')} | {_f(r['speed_ratio'], '.2f')} | "
                         f"{_f(r['speed_match'], '.3f')} | {_f(r['prediction_error'], '.2f')} | "
                         f"{_f(r['consistency'], '.3f')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="canvas side (data.image_size)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (data.frames)")
    p.add_argument("--speed", type=float, default=2.0, help="digit speed in px/frame (data.speed)")
    p.add_argument("--clips", type=int, default=500, help="clips per scored set")
    p.add_argument("--ref-clips", type=int, default=2000, help="reference (test split) clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared CPU)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = dict(name="moving_mnist", image_size=args.size, frames=args.frames, speed=args.speed)
    reference_cfg = DataConfig(**data, split="test", clips=args.ref_clips)
    reference = build_dataset(reference_cfg)
    train = build_dataset(DataConfig(**data, split="train", clips=args.clips))
    sets = candidate_sets(train, args.clips, args.seed)
    sets["test split itself"] = (reference.clips_NCTHW, reference.labels_N)
    rows = []
    for name, (clips, labels) in sets.items():
        m = score_clips(clips, labels, reference_cfg, seed=args.seed, reference=reference)
        rows.append(row(name, len(clips), m))
        print(rows[-1], flush=True)
    command = "python studies/video_metrics_calibration.py " + " ".join(sys.argv[1:])
    meta = {"size": args.size, "frames": args.frames, "speed": args.speed, "clips": args.clips,
            "ref_clips": len(reference), "ref_frames": len(reference) * reference.frames, "seed": args.seed,
            "device": f"{platform.machine()} CPU", "torch": torch.__version__, "python": platform.python_version(),
            "command": command.strip()}
    path = Path(args.out + ".json")
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    results[f"{args.size}px_{args.frames}f_speed{args.speed:g}"] = {"meta": meta, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
