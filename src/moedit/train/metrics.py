"""Metrics sinks: one JSON object per line in metrics.jsonl, optionally TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class MetricsWriter:
    """Appends to RUN/metrics.jsonl. Opening at `start_step` (a resumed run) first drops the rows logged
    after it: the resumed run logs those steps again, and a row logged twice would draw a curve twice."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and self.path.exists():
            _keep_through(self.path, start_step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError(
                    "train.tensorboard=true needs the tensorboard package; run: pip install tensorboard"
                ) from exc
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _keep_through(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def routing_metrics(model: torch.nn.Module) -> dict[str, float]:
    """Per MoE layer: MaxVio = max_e load_e / mean load − 1 and the top-1 share of assignments."""
    out = {}
    for i, layer in enumerate(model.moe_layers()):
        routing = layer.last_routing
        if routing is None or routing.token_M.numel() == 0:
            continue
        load_E = routing.load_E().float()
        out[f"route/maxvio/{i}"] = (load_E.max() / load_E.mean() - 1).item()
        out[f"route/top_share/{i}"] = (load_E.max() / load_E.sum()).item()
    return out


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
