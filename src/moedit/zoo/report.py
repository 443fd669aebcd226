"""The zoo's table and plot from the runs' result.json rows.

Per dataset, one row per entry: every number is the mean over the seeds that finished, with ± the
sample standard deviation over seeds (n − 1; none with a single seed) for the quality metrics. The
plot draws FD-LeNet and KID against training steps (mean over seeds; the band spans min to max).

The papers' orderings (the zoo file's `claims`) are checked on FD-LeNet and KID at the last step:
with Δ = mean(worse) − mean(better) and s = sd(better) + sd(worse) over seeds, a claim "agrees" when
Δ > s, "disagrees" when Δ < −s, and is "within seed spread" otherwise; one seed gives no verdict.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

QUALITY = (("fd_lenet", "FD-LeNet ↓", "{:.1f}", 1.0), ("kid", "KID ↓", "{:.2f}", 1.0),
           ("precision", "precision ↑", "{:.2f}", 1.0), ("recall", "recall ↑", "{:.2f}", 1.0),
           ("accuracy", "class acc. ↑", "{:.3f}", 1.0))
ROUTING = (("maxvio", "MaxVio", "{:.2f}"), ("top1_share", "top-1 share (max layer)", "{:.2f}"),
           ("entropy", "score entropy", "{:.2f}"), ("homogenisation", "expert cos", "{:.2f}"),
           ("pairs_95", "pairs for 95%", "{:.0%}"), ("mi_class_bits", "MI class (bits)", "{:.3f}"),
           ("mi_timestep_bits", "MI t (bits)", "{:.3f}"), ("experts_per_token", "experts/token", "{:.2f}"))


def group(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """dataset -> entry -> that entry's seed rows, in first-seen order."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[r["dataset"]][r["entry"]].append(r)
    return out


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list, fmt: str, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    mean, spread = mean_spread(values)
    return fmt.format(mean) + (f" ± {fmt.format(spread)}" if spread is not None else "")


def quality_table(entries: dict[str, list[dict]]) -> list[str]:
    head = ["entry", "seeds", "activated (M)", *[q[1] for q in QUALITY], "train s", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for name, runs in entries.items():
        finals = [r["final"] for r in runs]
        quality = [_cell([f[key] for f in finals], fmt, scale) for key, _, fmt, scale in QUALITY]
        wall = _cell([r["train_wall_s"] for r in runs], "{:.0f}")
        tps = _cell([r["tokens_per_s"] for r in runs], "{:,.0f}")
        router = runs[0]["params_router"]
        act = f"{runs[0]['params_activated'] / 1e6:.3f}" + (f" ({router / 1e3:.0f}k router)" if router else "")
        lines.append(f"| {name} | {len(runs)} | {act} | " + " | ".join([*quality, wall, tps]) + " |")
    return lines


def routing_table(entries: dict[str, list[dict]]) -> list[str]:
    head = ["entry", *[r[1] for r in ROUTING], "experts/token by t (data → noise)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, runs in entries.items():
        if not runs[0]["routing"]:
            continue  # dense: nothing routed
        cells = [_cell([r["routing"].get(key) for r in runs], fmt) for key, _, fmt in ROUTING]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_by_t(runs)} |")
    return lines


def verdict(better: list[float], worse: list[float]) -> str:
    """The module docstring's rule, on final scores of the two entries (lower is better)."""
    if len(better) < 2 or len(worse) < 2:
        return "no verdict (1 seed)"
    (mean_b, sd_b), (mean_w, sd_w) = mean_spread(better), mean_spread(worse)
    delta = mean_w - mean_b
    if delta > sd_b + sd_w:
        return "agrees"
    if delta < -(sd_b + sd_w):
        return "disagrees"
    return "within seed spread"


def claims_table(entries: dict[str, list[dict]], claims: Sequence) -> list[str]:
    lines = ["| paper's ordering (lower FID first) | source | FD-LeNet here | verdict | KID here | verdict |",
             "|---|---|---|---|---|---|"]
    for c in claims:
        if c.better not in entries or c.worse not in entries:
            continue
        cells = []
        for key, fmt in (("fd_lenet", "{:.1f}"), ("kid", "{:.2f}")):
            b = [r["final"][key] for r in entries[c.better]]
            w = [r["final"][key] for r in entries[c.worse]]
            cells += [f"{_cell(b, fmt)} vs {_cell(w, fmt)}", verdict(b, w)]
        lines.append(f"| {c.better} < {c.worse} | {c.source} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def _by_t(runs: list[dict]) -> str:
    """Mean over seeds of experts per token in each timestep bucket, as "a / b / c / d"."""
    series = [r["routing"].get("experts_per_token_T") for r in runs]
    series = [s for s in series if s]
    if not series:
        return "—"
    return " / ".join(f"{statistics.fmean(v):.2f}" for v in zip(*series))


def markdown(rows: list[dict], settings: dict, meta: str, claims: Sequence = ()) -> str:
    """Both tables per dataset, headed by the settings that make them comparable."""
    out = [f"Zoo: {settings['steps']} steps per run; evaluation: N = {settings['eval_n']} samples (EMA weights, "
           f"euler {settings['sampler_steps']} steps, guidance {settings['cfg_scale']:g}, sampling seed "
           f"{settings['eval_seed']}) against the test split; {meta}.",
           "Quality: mean ± standard deviation over seeds at the last step. Routing: training record, last "
           "quarter of the steps, mean over seeds (docs/EVALUATION.md; moedit/zoo/routing_stats.py)."]
    for dataset, entries in group(rows).items():
        out += ["", f"### {dataset}", "", *quality_table(entries), "", *routing_table(entries)]
        checked = claims_table(entries, claims)
        if checked:
            out += ["", "The papers' orderings against this table (verdict rule: moedit/zoo/report.py):", "", *checked]
    return "\n".join(out) + "\n"


def plot_curves(rows: list[dict], path: Path) -> Path:
    """FD-LeNet and KID against steps, one panel per dataset and metric, one line per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = group(rows)
    metrics = (("fd_lenet", "FD-LeNet", 1.0), ("kid", "KID", 1.0))
    fig, axes = plt.subplots(len(grouped), len(metrics), figsize=(6.5 * len(metrics), 4.6 * len(grouped)),
                             squeeze=False)
    cmap = plt.get_cmap("tab20")
    for i, (dataset, entries) in enumerate(grouped.items()):
        for j, (key, label, scale) in enumerate(metrics):
            ax = axes[i][j]
            for k, (name, runs) in enumerate(entries.items()):
                steps = [p["step"] for p in runs[0]["curve"]]
                vals = [[r["curve"][s][key] * scale for r in runs] for s in range(len(steps))]
                style = "--" if name == "dense" else "-"
                colour = cmap((2 * k) % 20 + (2 * k // 20) % 2)  # the ten dark tab20 colours first, then the pale ones
                ax.plot(steps, [statistics.fmean(v) for v in vals], style, marker="o", ms=3, color=colour, label=name)
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=colour, alpha=0.12)
            if key == "fd_lenet":  # KID is unbiased and may dip below 0: linear
                ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
            ax.set_title(f"{dataset}: {label} (lower is better)")
            ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
