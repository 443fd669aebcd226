"""`moedit diagnose`: the routing record of a run as a markdown report with PNG figures.

Figures (RUN/diagnostics/, matplotlib Agg backend):
- load_heatmaps.png     per MoE layer, each expert's share of the assignments over training
- deadlock_timeline.png top-1 share per layer over training, the deadlock threshold, detected spans
- depth_profile.png     per layer (by block index): share of steps at or above the deadlock threshold
- timestep_routing.png  per layer, expert share within each timestep bucket; experts per token and
                        score entropy by bucket (the last quarter of the record)
- class_routing.png     per layer, expert share within each class slot, null class included (same window)
- saturation.png        score entropy and the experts' mean output cosine (probes) over training
- depth_statistics.png  the per-layer table's statistics against block index (thirds shaded): top-1
                        share, most / least loaded share, tokens with 0 experts, score entropy, probe
                        cosine; for video runs also each layer's largest frame deviation
- load_by_frame.png     video runs (F > 1 frames) only: per layer, each (frame, expert)'s share of the
                        layer's assignments (the last quarter); report.md lists per layer the largest
                        total-variation distance of a frame's expert distribution from the layer's

Long records are shown in at most `MAX_BINS` time bins: the counts of consecutive records are summed,
so a bin's share is the share of everything routed in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moedit.diagnostics import record as rec  # noqa: E402
from moedit.diagnostics.detectors import THIRDS, depth_third, summary_lines  # noqa: E402
from moedit.utils.files import atomic_write, atomic_write_text  # noqa: E402

MAX_BINS = 400
TAIL = 0.25  # per-timestep and per-class tables use the last quarter of the record
COUNT_FIELDS = ("tokens", "tokens_T", "tokens_C", "load_YE", "load_YTE", "load_YCE", "top1_YE", "fanout_YJ",
                "entropy_Y", "entropy_YT", "weight_Y", "probe_cos_Y", "probes", "steps")
FRAME_FIELDS = ("tokens_F", "load_YFE")  # video records only
FRAME_TV_NOTE = 0.1  # a layer whose largest frame deviation reaches this is named in the report's text


def count_fields(records: np.ndarray) -> tuple[str, ...]:
    return COUNT_FIELDS + tuple(f for f in FRAME_FIELDS if f in (records.dtype.names or ()))


def bin_records(records: np.ndarray, max_bins: int = MAX_BINS) -> dict[str, np.ndarray]:
    """Sums of consecutive records in at most max_bins groups; `step` is each group's last step."""
    starts = np.unique(np.linspace(0, len(records), min(max_bins, len(records)), endpoint=False).astype(int))
    out = {name: np.add.reduceat(np.asarray(records[name], np.float64), starts, axis=0)
           for name in count_fields(records)}
    out["step"] = np.asarray(records["step"])[np.r_[starts[1:] - 1, len(records) - 1]]
    return out


def tail(records: np.ndarray, fraction: float = TAIL) -> np.ndarray:
    return records[int(len(records) * (1 - fraction)):] if len(records) > 1 else records


def collapse(records: np.ndarray) -> np.ndarray:
    """One record holding the sums of all of them (its step is the last one's)."""
    out = np.zeros(1, records.dtype)
    for name in count_fields(records):
        out[name] = records[name].sum(0)
    out["step"] = records["step"][-1]
    return out


def _grid(n: int, width: float = 3.2, height: float = 2.6):
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.2, height * rows + 0.6), squeeze=False,
                             layout="constrained")  # room for the shared colorbar and every panel's labels
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat[:n]


def _layer_title(y: int, blocks: list[int], depth: int) -> str:
    return f"MoE layer {y} (block {blocks[y]}, {depth_third(blocks[y], depth)})"


def _savefig(fig, path: Path) -> Path:
    """Written atomically: a kill mid-write leaves the previous figure, never a truncated PNG."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return _savefig(fig, path)


def plot_load_heatmaps(binned: dict, header: dict, path: Path) -> Path:
    share_RYE = rec.ratio(binned["load_YE"], binned["load_YE"].sum(-1, keepdims=True))
    steps, Y = binned["step"], share_RYE.shape[1]
    fig, axes = _grid(Y)
    vmax = float(np.nanmax(share_RYE)) if np.isfinite(share_RYE).any() else 1.0
    for y, ax in enumerate(axes):
        im = ax.imshow(share_RYE[:, y].T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, share_RYE.shape[2] - 0.5),
                       interpolation="nearest")
        ax.set(title=_layer_title(y, header["blocks"], header["depth"]), xlabel="step", ylabel="expert")
    fig.colorbar(im, ax=list(axes), label="share of assignments", shrink=0.9)
    fig.suptitle("Expert load over training (uniform = 1/E = %.3f)" % (1 / share_RYE.shape[2]))
    return _savefig(fig, path)


def _colors(n: int):
    return plt.cm.viridis(np.linspace(0, 0.9, max(n, 1)))


def plot_deadlock_timeline(binned: dict, header: dict, summary: dict | None, threshold: float, path: Path) -> Path:
    share_RY = rec.ratio(binned["top1_YE"].max(-1), binned["top1_YE"].sum(-1))
    steps, Y, colors = binned["step"], share_RY.shape[1], _colors(share_RY.shape[1])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10.5, 6.5), sharex=True, height_ratios=[2, 1])
    for y in range(Y):
        top.plot(steps, share_RY[:, y], color=colors[y], lw=1.2, label=f"layer {y} (block {header['blocks'][y]})")
    top.axhline(threshold, color="red", ls="--", lw=1, label=f"deadlock threshold {threshold}")
    top.axhline(1 / header["num_experts"], color="gray", ls=":", lw=1, label="uniform 1/E")
    top.set(ylabel="top-1 share", ylim=(0, 1.02), title="Top-1 share per MoE layer")
    top.legend(fontsize=7, ncol=2 if Y > 12 else 1, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines
    spans = {d["layer"]: d["intervals"] for d in (summary or {}).get("deadlock", [])}
    for y in range(Y):
        for start, end in spans.get(y, []):
            end = end if end is not None else steps[-1]
            bottom.broken_barh([(start, max(end - start, 1))], (y - 0.4, 0.8), color="crimson")
    bottom.set(yticks=range(Y), yticklabels=[f"{y} (b{b})" for y, b in enumerate(header["blocks"])],
               ylim=(-0.6, Y - 0.4), xlabel="step", ylabel="MoE layer (block)",
               title="Detected selective deadlocks" + ("" if spans else ": none"))
    return _save(fig, path)


def plot_depth_profile(records: np.ndarray, header: dict, summary: dict | None, threshold: float,
                       path: Path) -> Path:
    share_RY = rec.top1_share_RY(records)
    blocks, depth = header["blocks"], header["depth"]
    above_Y = np.nanmean(np.where(np.isnan(share_RY), np.nan, share_RY >= threshold), axis=0)
    detected = {d["layer"] for d in (summary or {}).get("deadlock", [])}
    fig, ax = plt.subplots(figsize=(max(5.5, 0.5 * depth + 2), 4))
    _shade_thirds(ax, depth, label_y=1.04)
    colors = ["crimson" if y in detected else "gray" for y in range(len(blocks))]
    ax.bar(blocks, above_Y, color=colors, width=0.6)
    ax.plot(blocks, np.nanmean(rec.top1_share_RY(tail(records)), axis=0), "ko", ms=4)
    handles = [plt.Rectangle((0, 0), 1, 1, color="crimson"), plt.Rectangle((0, 0), 1, 1, color="gray"),
               plt.Line2D([], [], color="k", marker="o", ls="", ms=4)]
    labels = [f"steps with top-1 share ≥ {threshold}: deadlock detected", "... no deadlock detected",
              "mean top-1 share, last quarter"]
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.set(xlim=(-0.5, depth - 0.5), ylim=(0, 1.1), xticks=range(depth), xlabel="block index",
           ylabel="share", title="Depth profile of deadlock")
    return _save(fig, path)


def _share_heatmaps(load_YXE: np.ndarray, row_labels: list[str], header: dict, ylabel: str, title: str,
                    path: Path) -> Path:
    share_YXE = rec.ratio(load_YXE, load_YXE.sum(-1, keepdims=True))
    vmax = float(np.nanmax(share_YXE)) if np.isfinite(share_YXE).any() else 1.0
    fig, axes = _grid(share_YXE.shape[0], height=0.25 * len(row_labels) + 1.8)
    for y, ax in enumerate(axes):  # a white row is a bucket or class with no tokens in the window
        im = ax.imshow(share_YXE[y], aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set(title=_layer_title(y, header["blocks"], header["depth"]), xlabel="expert", ylabel=ylabel,
               yticks=range(len(row_labels)), yticklabels=row_labels)
        ax.tick_params(axis="y", labelsize=7)
    fig.colorbar(im, ax=list(axes), label="share of the row's assignments", shrink=0.9)
    fig.suptitle(title)
    return _savefig(fig, path)


def plot_timestep_routing(window: dict, header: dict, steps: str, path: Path) -> Path:
    edges = header["t_edges"]
    labels = [f"t {edges[i]:.2f}-{edges[i + 1]:.2f}" for i in range(len(edges) - 1)]
    return _share_heatmaps(window["load_YTE"][0], labels, header, "timestep bucket",
                           f"Expert share by timestep (t = 0 data, 1 noise), steps {steps}", path)


def plot_timestep_profile(window: dict, header: dict, steps: str, path: Path) -> Path:
    tokens_T = window["tokens_T"][0]
    per_token_YT = rec.ratio(window["load_YTE"][0].sum(-1), tokens_T[None])
    entropy_YT = rec.ratio(window["entropy_YT"][0], tokens_T[None])
    centres = np.diff(header["t_edges"]) / 2 + np.asarray(header["t_edges"][:-1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for y, color in enumerate(_colors(per_token_YT.shape[0])):
        left.plot(centres, per_token_YT[y], "o-", color=color, label=f"layer {y}")
        right.plot(centres, entropy_YT[y], "o-", color=color, label=f"layer {y}")
    left.set(xlabel="t", ylabel="experts per token", title="Experts per token by timestep", xlim=(0, 1))
    right.set(xlabel="t", ylabel="normalised score entropy", title="Score entropy by timestep", xlim=(0, 1),
              ylim=(0, 1.02))
    left.legend(fontsize=7)
    fig.suptitle(f"steps {steps}")
    return _save(fig, path)


def _shade_thirds(ax, depth: int, label_y: float | None = None) -> None:
    shades = {"shallow": "#dbe9f6", "middle": "#f2f2f2", "deep": "#fbe3d6"}
    for name in THIRDS:
        in_third = [b for b in range(depth) if depth_third(b, depth) == name]
        if in_third:
            ax.axvspan(in_third[0] - 0.5, in_third[-1] + 0.5, color=shades[name], zorder=0)
            if label_y is not None:
                ax.text((in_third[0] + in_third[-1]) / 2, label_y, name, ha="center", fontsize=8)


def plot_depth_statistics(window_records: np.ndarray, header: dict, thresholds: dict, steps: str, path: Path,
                          frame_tv_Y: np.ndarray | None = None) -> Path:
    """The per-layer table's statistics against block index, so a depth profile (U shape) can be read off."""
    stats, blocks, depth = layer_stats(window_records, header), header["blocks"], header["depth"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 0.5 * depth + 6), 4.6), layout="constrained")
    for ax in (left, right):
        _shade_thirds(ax, depth, label_y=1.1)
    for name, style in (("top-1 share", "ko-"), ("most loaded", "^-"), ("least loaded", "v-"),
                        ("tokens with 0 experts", "x:")):
        left.plot(blocks, stats[name], style, ms=5, lw=1.2, label=name)
    if frame_tv_Y is not None:
        left.plot(blocks, frame_tv_Y, "s--", color="purple", ms=5, lw=1.2, label="largest frame deviation (TV)")
    left.axhline(thresholds["deadlock_share"], color="red", ls="--", lw=1, label="deadlock threshold")
    left.axhline(1 / header["num_experts"], color="gray", ls=":", lw=1, label="uniform 1/E")
    left.set(xlim=(-0.5, depth - 0.5), ylim=(0, 1.16), xticks=range(depth), xlabel="block index", ylabel="share",
             title="Load, top-1 share" + (", frame deviation" if frame_tv_Y is not None else ""))
    right.plot(blocks, stats["score entropy"], "o-", color="tab:blue", ms=5, lw=1.2, label="score entropy")
    right.plot(blocks, stats["expert cosine (last probe)"], "s-", color="tab:green", ms=5, lw=1.2,
               label="expert cosine (last probe)")
    right.axhline(thresholds["saturation_entropy"], color="tab:blue", ls="--", lw=1, label="entropy threshold")
    right.axhline(thresholds["saturation_cosine"], color="tab:green", ls="--", lw=1, label="cosine threshold")
    right.set(xlim=(-0.5, depth - 0.5), ylim=(-0.2, 1.16), xticks=range(depth), xlabel="block index",
              ylabel="value", title="Saturation indicators")
    for ax in (left, right):
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(f"Routing statistics by depth (MoE layers only), steps {steps}")
    return _savefig(fig, path)


def plot_frame_heatmaps(window: np.ndarray, header: dict, steps: str, path: Path) -> Path:
    """Video runs: per layer, frame × expert share of the layer's assignments (one collapsed record)."""
    share_YFE = rec.frame_share_RYFE(window)[0]
    tv = frame_stats(window)
    Y, F, E = share_YFE.shape
    vmax = float(np.nanmax(share_YFE)) if np.isfinite(share_YFE).any() else 1.0
    fig, axes = _grid(Y, height=min(0.22 * F, 5.0) + 1.9)
    tick = max(1, -(-F // 16))
    for y, ax in enumerate(axes):
        im = ax.imshow(share_YFE[y], aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        deviation = (f"max frame TV {tv['max_tv'][y]:.2f} (frame {int(tv['frame'][y])})"
                     if np.isfinite(tv["max_tv"][y]) else "no assignments")
        ax.set(title=_layer_title(y, header["blocks"], header["depth"]) + "\n" + deviation, xlabel="expert",
               ylabel="frame", yticks=range(0, F, tick), xticks=range(0, E, max(1, -(-E // 16))))
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=list(axes), label="share of the layer's assignments", shrink=0.9)
    fig.suptitle(f"Expert load by frame, steps {steps}: {F} frames, uniform = 1/(F·E) = {1 / (F * E):.3f}; "
                 "rows that differ = frame-specialised routing")
    return _savefig(fig, path)


def plot_saturation(binned: dict, header: dict, thresholds: dict, path: Path) -> Path:
    entropy_RY = rec.ratio(binned["entropy_Y"], binned["tokens"][:, None])
    cos_RY = rec.ratio(binned["probe_cos_Y"], binned["probes"][:, None])
    has_probe = binned["probes"] > 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for y, color in enumerate(_colors(entropy_RY.shape[1])):
        left.plot(binned["step"], entropy_RY[:, y], color=color, lw=1.2, label=f"layer {y}")
        right.plot(binned["step"][has_probe], cos_RY[has_probe, y], ".-", color=color, lw=1, label=f"layer {y}")
    left.axhline(thresholds["saturation_entropy"], color="red", ls="--", lw=1, label="saturation threshold")
    right.axhline(thresholds["saturation_cosine"], color="red", ls="--", lw=1, label="saturation threshold")
    left.set(xlabel="step", ylabel="normalised score entropy", ylim=(0, 1.02), title="Score entropy (1 = uniform)")
    right.set(xlabel="step", ylabel="mean pairwise cosine", ylim=(-0.2, 1.02),
              title="Expert outputs' cosine on the same tokens" + ("" if has_probe.any() else " (no probes)"))
    left.legend(fontsize=7, ncol=2 if entropy_RY.shape[1] > 6 else 1)
    return _save(fig, path)


# ----------------------------------------------------------------------------- markdown


def _fmt(value: float, pct: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.1%}" if pct else f"{value:.3f}"


PCT_STATS = {"top-1 share", "most loaded", "least loaded", "tokens with 0 experts"}


def layer_stats(records: np.ndarray, header: dict) -> dict[str, np.ndarray]:
    """Per MoE layer over the given records (their counts summed): the per-layer table's columns, in order."""
    total = collapse(records)
    probed = records[records["probes"] > 0]
    cos_Y = rec.probe_cos_RY(probed)[-1] if len(probed) else np.full(len(header["blocks"]), np.nan)
    share_YE = rec.load_share_RYE(total)[0]
    return {"top-1 share": rec.top1_share_RY(total)[0], "most loaded": share_YE.max(-1),
            "least loaded": share_YE.min(-1), "score entropy": rec.entropy_RY(total)[0],
            "mean weight": rec.weight_mean_RY(total)[0], "experts/token": rec.experts_per_token_RY(total)[0],
            "tokens with 0 experts": rec.zero_expert_share_RY(total)[0], "expert cosine (last probe)": cos_Y}


def layer_table(records: np.ndarray, header: dict) -> list[str]:
    """One row per MoE layer over the given records (their counts summed)."""
    stats = layer_stats(records, header)
    rows = ["| layer | block | third | " + " | ".join(stats) + " |", "|---|---|---|" + "---|" * len(stats)]
    for y, b in enumerate(header["blocks"]):
        cells = " | ".join(_fmt(values[y], name in PCT_STATS) for name, values in stats.items())
        rows.append(f"| {y} | {b} | {depth_third(b, header['depth'])} | {cells} |")
    return rows


def frame_stats(window: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer over one collapsed record of a video run: the largest frame deviation (TV distance), its
    frame (−1: none), the mean over frames, and the range of experts per token over frames. Frames without
    assignments are left out (all of them: NaN)."""
    tv_YF = rec.frame_tv_RYF(window)[0]
    ok_YF = np.isfinite(tv_YF)
    has_Y = ok_YF.any(-1)
    filled_YF = np.where(ok_YF, tv_YF, -1.0)
    per_token_YF = rec.ratio(window["load_YFE"][0].sum(-1), window["tokens_F"][0][None])
    seen_YF = np.isfinite(per_token_YF)
    lo = np.where(seen_YF, per_token_YF, np.inf).min(-1)
    hi = np.where(seen_YF, per_token_YF, -np.inf).max(-1)
    seen_Y = seen_YF.any(-1)
    return {"max_tv": np.where(has_Y, filled_YF.max(-1), np.nan), "frame": np.where(has_Y, filled_YF.argmax(-1), -1),
            "mean_tv": rec.ratio(np.where(ok_YF, tv_YF, 0.0).sum(-1), ok_YF.sum(-1)),
            "per_token_min": np.where(seen_Y, lo, np.nan), "per_token_max": np.where(seen_Y, hi, np.nan)}


def frame_section(window: np.ndarray, header: dict, span: str) -> list[str]:
    """report.md's by-frame part for a video run: one sentence naming the most frame-specialised layer
    (and every layer at or above FRAME_TV_NOTE), then one row per layer."""
    F, stats, blocks = header["frames"], frame_stats(window), header["blocks"]
    lines = [f"## Routing by frame, steps {span} (last quarter)", "",
             f"Video run: {F} frames (temporal token positions). Frame deviation = total-variation distance "
             "½ Σ_e |q_fe − p_e| between frame f's expert distribution q_f and the layer's over all frames p "
             "(0: the frame routes like the layer, 1: disjoint experts; finite counts leave a small floor even "
             "without any frame dependence).", ""]
    if not np.isfinite(stats["max_tv"]).any():
        return lines + ["No assignments in the window: no frame deviation.", ""]
    y = int(np.nanargmax(stats["max_tv"]))
    flagged = [f"{i} (block {blocks[i]}, {stats['max_tv'][i]:.3f})" for i in range(len(blocks))
               if stats["max_tv"][i] >= FRAME_TV_NOTE]
    lines.append(f"Largest frame deviation: MoE layer {y} (block {blocks[y]}, {depth_third(blocks[y], header['depth'])}"
                 f"), frame {int(stats['frame'][y])}, TV {stats['max_tv'][y]:.3f}. "
                 + (f"Layers with a frame deviation ≥ {FRAME_TV_NOTE} (frame-specialised): {', '.join(flagged)}."
                    if flagged else f"No layer reaches {FRAME_TV_NOTE}: routing barely depends on the frame."))
    lines += ["", "| layer | block | third | max frame deviation (TV) | at frame | mean over frames | "
              "experts/token by frame (min–max) |", "|---|---|---|---|---|---|---|"]
    for i, b in enumerate(blocks):
        frame = int(stats["frame"][i])
        lines.append(f"| {i} | {b} | {depth_third(b, header['depth'])} | {_fmt(stats['max_tv'][i])} | "
                     f"{frame if frame >= 0 else '–'} | {_fmt(stats['mean_tv'][i])} | "
                     f"{_fmt(stats['per_token_min'][i])}–{_fmt(stats['per_token_max'][i])} |")
    return lines + [""]


def token_table(tokens: np.ndarray, limit: int = 12) -> list[str]:
    if len(tokens) == 0:
        return ["No token decisions were sampled (diagnostics.token_samples=0)."]
    last = tokens[tokens["step"] == tokens["step"][-1]][:limit]
    video = "frame" in tokens.dtype.names
    rows = ["| step | layer | sample | position |" + (" frame |" if video else "") + " t | label | experts | "
            "chosen (weight) |", "|---|---|---|---|" + ("---|" if video else "") + "---|---|---|---|"]
    for r in last:
        chosen = ", ".join(f"{e} ({w:.3f})" for e, w in zip(r["expert_K"], r["weight_K"]) if e >= 0)
        frame = f" {r['frame']} |" if video else ""
        rows.append(f"| {r['step']} | {r['layer']} | {r['sample']} | {r['position']} |{frame} {r['t']:.3f} | "
                    f"{r['label']} | {r['count']} | {chosen or '–'} |")
    return rows


def _events_table(events: list[dict]) -> list[str]:
    if not events:
        return ["No detector fired."]
    rows = ["| detected at step | event | layer (block, third) | from step | to step |", "|---|---|---|---|---|"]
    for e in events:
        where = f"{e['layer']} ({e['block']}, {e['depth']})" if "layer" in e else "all layers"
        rows.append(f"| {e['step']} | {e['kind']} | {where} | {e.get('start_step', e['step'])} | "
                    f"{e.get('end_step', '') if e.get('end_step') is not None else ''} |")
    return rows


FIGURE_NOTES = [
    ("load_heatmaps.png", "Expert load", "each expert's share of the layer's assignments over training; a "
     "single bright row is a deadlocked layer, an even field is balanced routing."),
    ("deadlock_timeline.png", "Deadlock timeline", "top-1 share (tokens whose best-scoring expert is the "
     "layer's favourite) per layer; red bars are the detected deadlocks."),
    ("depth_profile.png", "Depth profile", "share of recorded steps each layer spent at or above the deadlock "
     "threshold, by block index; the paper finds deadlocks at the shallow and deep ends."),
    ("timestep_routing.png", "Routing by timestep", "within each timestep bucket, each expert's share: "
     "timestep specialisation shows as rows that differ."),
    ("timestep_profile.png", "Experts per token and entropy by timestep", "for routers that give a token "
     "0..E experts (race, expert choice, DiffMoE), how compute is spread over t."),
    ("class_routing.png", "Routing by class", "within each class (and the null class of classifier-free "
     "guidance), each expert's share."),
    ("saturation.png", "Soft saturation", "score entropy and the experts' mean output cosine on the same "
     "tokens; both near their thresholds is the saturated, homogenised state."),
    ("depth_statistics.png", "Routing statistics by depth", "the per-layer table against block index (last "
     "quarter, thirds shaded): top-1 share, most and least loaded expert's share and tokens with 0 experts "
     "(left), score entropy and last probe cosine (right); a U shape is high values at both ends. Video runs "
     "also show each layer's largest frame deviation."),
]
VIDEO_FIGURE_NOTES = [
    ("load_by_frame.png", "Load by frame", "per layer, each (frame, expert) cell's share of the layer's "
     "assignments in the last quarter (rows: frames, uniform = 1/(F·E)); a layer whose rows differ routes by "
     "frame, a row brighter or darker overall gets more or less compute."),
]


def _warn(message: str) -> None:
    print(f"moedit diagnose: warning: {message}", file=sys.stderr)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, warn=_warn) -> Path:
    """Figures and report.md in out_dir (default RUN/diagnostics); returns the report's path. Damage the
    record could be read around (see RoutingRecord) is passed to `warn` and listed in the report."""
    record = rec.RoutingRecord(run_dir)
    for note in record.notes:
        warn(note)
    records, header = record.records, record.header
    if len(records) == 0:
        raise rec.DiagnosticsError(f"{record.dir} holds a header but no records yet: train at least "
                                   "diagnostics.every steps (records are written at each log step)")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    thresholds = (record.summary or {}).get("thresholds") or _default_thresholds()
    binned, window_records = bin_records(records), tail(records)
    window = collapse(window_records)
    span = f"{int(window_records['step'][0]) - int(window_records['steps'][0]) + 1}-{int(window_records['step'][-1])}"
    plot_load_heatmaps(binned, header, out / "load_heatmaps.png")
    plot_deadlock_timeline(binned, header, record.summary, thresholds["deadlock_share"], out / "deadlock_timeline.png")
    plot_depth_profile(records, header, record.summary, thresholds["deadlock_share"], out / "depth_profile.png")
    plot_timestep_routing(window, header, span, out / "timestep_routing.png")
    plot_timestep_profile(window, header, span, out / "timestep_profile.png")
    _share_heatmaps(window["load_YCE"][0], header["class_slots"], header, "class",
                    f"Expert share by class, steps {span}", out / "class_routing.png")
    plot_saturation(binned, header, thresholds, out / "saturation.png")
    video = record.frames > 1
    frame_tv_Y = frame_stats(window)["max_tv"] if video else None
    plot_depth_statistics(window_records, header, thresholds, span, out / "depth_statistics.png", frame_tv_Y)
    if video:
        plot_frame_heatmaps(window, header, span, out / "load_by_frame.png")
    return atomic_write_text(out / "report.md", "\n".join(_markdown(run_dir, record, window_records, span)) + "\n")


def _default_thresholds() -> dict:
    from moedit.config import DiagnosticsConfig

    d = DiagnosticsConfig()
    return {k: getattr(d, k) for k in ("deadlock_share", "deadlock_streak", "deadlock_release", "saturation_entropy",
                                       "saturation_cosine", "saturation_streak")}


def _markdown(run_dir, record: rec.RoutingRecord, window_records: np.ndarray, span: str) -> list[str]:
    h, records, video = record.header, record.records, record.frames > 1
    lines = [f"# Routing diagnostics: {run_dir}", "",
             (f"Video model, {record.frames} frames (temporal token positions). " if video else "") +
             f"{len(h['blocks'])} MoE layers (blocks {h['blocks']} of {h['depth']}), {h['num_experts']} routed "
             f"experts, scores {sorted(set(h['score_kinds']))}; {len(records)} records "
             f"(steps {int(records['step'][0]) - int(records['steps'][0]) + 1}-{int(records['step'][-1])}, "
             f"{h['every']} step(s) each), {len(record.tokens)} sampled token decisions.", "", "## Findings", ""]
    lines += [f"- Damaged and skipped: {note}" for note in record.notes] + ([""] if record.notes else [])
    if record.summary is None:
        lines += ["The run has no readable routing/summary.json (still training, or stopped early): the events "
                  "below are those detected so far.", ""]
    else:
        lines += [f"- {line}" for line in summary_lines(record.summary)] + [""]
    lines += _events_table(record.events) + ["", f"## Per layer, steps {span} (last quarter)", ""]
    lines += layer_table(window_records, h) + [""]
    if video:
        lines += frame_section(collapse(window_records), h, span)
    lines += ["## Figures", ""]
    for name, title, note in FIGURE_NOTES + (VIDEO_FIGURE_NOTES if video else []):
        lines += [f"### {title}", "", note, "", f"![{title}]({name})", ""]
    lines += ["## Sampled token decisions (last recorded step)", "",
              f"Label {h['num_classes']} is the null class (dropped for classifier-free guidance).", ""]
    return lines + token_table(record.tokens)
