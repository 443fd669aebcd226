"""Markdown tables of the benchmark results (the JSON holds every field)."""

from __future__ import annotations


def _meta_line(meta: dict) -> str:
    return (f"{meta['device']}, torch {meta['torch']}, Python {meta['python']}, {meta['threads']} CPU threads; "
            f"preset {meta['preset']}; median of {meta['repeats']} timed calls after 3 warm-ups.")


def layer_markdown(result: dict) -> str:
    lines = [_meta_line(result["meta"]) + f" dtype {result['meta']['dtype']}; useful TFLOP/s counts only the experts' "
             "matrix products (fwd+bwd = 3·2·T·k·D·H·2).", "",
             "| case | routing (max/mean load) | implementation | ms | useful TFLOP/s | × dense | peak MiB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        where = f"| {r['case']} | {r['routing']} ({r['max_over_mean_load']:.1f}) | {r['impl']} |"
        if r.get("failed"):
            lines.append(f"{where} failed: {_cell(r['failed'])} | — | — | — |")
            continue
        peak, ratio = _peak_and_ratio(r)
        lines.append(f"{where} {r['ms']:.2f} | {r['tflops']:.3g} | {ratio} | {peak} |")
    return "\n".join(lines) + "\n"


def _peak_and_ratio(row: dict) -> tuple[str, str]:
    """The peak-memory and ×-dense cells ("—" where not measured: CPU memory, the dense row itself)."""
    peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "—"
    ratio = f"{row['ratio_to_dense']:.2f}" if row["ratio_to_dense"] is not None else "—"
    return peak, ratio


def _cell(text: str) -> str:
    """A failure message as one table cell: one line, no column separators."""
    return text.replace("|", "/").replace("\n", " ")[:200]


def failures(result: dict) -> list[str]:
    """'what: why' for each row that failed."""
    return [f"{r.get('case', '')} {r.get('routing', '')} {r.get('impl', r.get('variant'))}: {r['failed']}".strip()
            for r in result["rows"] if r.get("failed")]


def model_markdown(result: dict) -> str:
    sampler = f" Sampling: {result['meta']['sampler']}." if "sampler" in result["meta"] else ""
    lines = [_meta_line(result["meta"]) + f" Batch {result['meta']['batch']}." + sampler, "",
             "| variant | ms per call (step or batch) | images/s | × dense | peak MiB | parameters |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r.get("failed"):
            lines.append(f"| {r['variant']} | failed: {_cell(r['failed'])} | — | — | — | — |")
            continue
        peak, ratio = _peak_and_ratio(r)
        lines.append(f"| {r['variant']} | {r['ms']:.1f} | {r['img_per_s']:.1f} | {ratio} | {peak} | {r['params'] / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"
