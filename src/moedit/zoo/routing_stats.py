"""The routing metrics of docs/EVALUATION.md ("Routing metrics") for one run, read from its training
routing record (RUN/routing/).

Over the last quarter of training (diagnostics/report.py `tail`), summed into one record, per MoE
layer and then averaged over layers (top-1 share: the worst layer):

- maxvio: max_e load_e / mean_e load_e − 1 over the configured routed experts (ProMoE's unconditional
  expert, index E, serves only null-label tokens and is left out, as in studies/compare_routers.py);
- top1_share: share of tokens whose highest-scoring expert is the layer's most chosen one (deadlock ≥ 0.9);
- entropy: normalised score entropy (1 = uniform scores);
- homogenisation: mean pairwise cosine of the experts' outputs on the same probe tokens;
- mi_class, mi_timestep: mutual information, in bits, between the chosen expert and the class label
  (real labels only) / the timestep bucket, from the joint assignment counts;
- experts_per_token and zero_expert_share (race, expert choice and DiffMoE may give a token 0..E),
  and experts_per_token_T per timestep bucket (t from 0 = data to 1 = noise): where the compute goes;
- pairs_95: combination usage (Race-DiT): the co-activated expert pairs of the sampled tokens
  (RUN/routing/tokens.bin), counted, sorted, cumulated: the share of the E(E−1)/2 possible pairs
  needed to hold 95% of the mass. None when tokens never get two experts (top-1 routers).
"""

from __future__ import annotations

import warnings
from itertools import combinations
from pathlib import Path

import numpy as np

from moedit.diagnostics import record as rec
from moedit.diagnostics.report import collapse, tail

PAIR_MASS = 0.95


def mutual_information_bits(joint_XE: np.ndarray) -> float:
    """I(X; E) in bits of a joint count table (rows: the other variable, columns: experts)."""
    joint = np.asarray(joint_XE, np.float64)
    total = joint.sum()
    if total <= 0:
        return float("nan")
    p_XE = joint / total
    outer_XE = p_XE.sum(1, keepdims=True) * p_XE.sum(0, keepdims=True)
    keep = p_XE > 0
    return float((p_XE[keep] * np.log2(p_XE[keep] / outer_XE[keep])).sum())


def pair_share(experts_TK: np.ndarray, num_experts: int, mass: float = PAIR_MASS) -> float | None:
    """Share of all expert pairs needed to cover `mass` of the co-activations of these tokens' experts
    (rows: tokens, −1 = empty slot). None when no token has two experts."""
    counts: dict[tuple[int, int], int] = {}
    for row in experts_TK:
        chosen = sorted(int(e) for e in row if 0 <= e < num_experts)
        for pair in combinations(chosen, 2):
            counts[pair] = counts.get(pair, 0) + 1
    if not counts:
        return None
    sorted_P = np.sort(np.fromiter(counts.values(), np.float64))[::-1]
    needed = int(np.searchsorted(np.cumsum(sorted_P) / sorted_P.sum(), mass - 1e-12)) + 1
    return needed / (num_experts * (num_experts - 1) / 2)


def _per_bucket(one: np.ndarray) -> list[float]:
    """Experts per token in each timestep bucket, mean over layers (NaN for a bucket no token fell in)."""
    per_YT = rec.ratio(one["load_YTE"][0].sum(-1), one["tokens_T"][0][None, :])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty bucket is NaN in every layer
        return [float(v) for v in np.nanmean(per_YT, axis=0)]


def routing_stats(run_dir: str | Path, num_experts: int, num_classes: int) -> dict:
    """The module docstring's metrics for a MoE run; {} for a dense one (no routing record)."""
    if not (Path(run_dir) / "routing" / "header.json").exists():
        return {}
    record = rec.RoutingRecord(run_dir)
    window = tail(record.records)
    one = collapse(window)
    E = num_experts
    load_YE = one["load_YE"][0][:, :E].astype(np.float64)
    maxvio_Y = load_YE.max(-1) / np.maximum(load_YE.mean(-1), 1e-12) - 1
    cos_Y = rec.probe_cos_RY(collapse(window[window["probes"] > 0]))[0] if (window["probes"] > 0).any() else None
    mi_class = [mutual_information_bits(c_CE[:num_classes, :E]) for c_CE in one["load_YCE"][0]]
    mi_t = [mutual_information_bits(t_TE[:, :E]) for t_TE in one["load_YTE"][0]]
    first_step = int(window["step"][0]) - int(window["steps"][0]) + 1
    tokens = record.tokens[record.tokens["step"] >= first_step]
    pairs = [pair_share(tokens["expert_K"][tokens["layer"] == y], E) for y in range(load_YE.shape[0])]
    pairs = [p for p in pairs if p is not None]
    return {
        "window_steps": [first_step, int(window["step"][-1])],
        "maxvio": float(maxvio_Y.mean()),
        "top1_share": float(np.nanmax(rec.top1_share_RY(one)[0])),
        "entropy": float(np.nanmean(rec.entropy_RY(one)[0])),
        "homogenisation": float(np.nanmean(cos_Y)) if cos_Y is not None else None,
        "mi_class_bits": float(np.nanmean(mi_class)),
        "mi_timestep_bits": float(np.nanmean(mi_t)),
        "experts_per_token": float(np.nanmean(rec.experts_per_token_RY(one)[0])),
        "experts_per_token_T": _per_bucket(one),
        "zero_expert_share": float(np.nanmean(rec.zero_expert_share_RY(one)[0])),
        "pairs_95": float(np.mean(pairs)) if pairs else None,
    }
