"""Metrics sinks: one JSON object per line in metrics.jsonl, optionally TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moedit.config import ConfigError
from moedit.utils import jsonl
from moedit.utils.files import PathError, describe_os_error, ensure_writable_dir


class MetricsWriter:
    """Appends to RUN/metrics.jsonl. Opening at `start_step` (a resumed run) first drops the rows logged
    after it: the resumed run logs those steps again, and a row logged twice would draw a curve twice.
    The file is cut in place, never rewritten, so a kill while opening cannot lose the history."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, enabled: bool = True, start_step: int = 0,
                 log=print):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        writer_class = summary_writer_class() if enabled and tensorboard else None  # before any file changes
        if enabled and self.path.exists():
            jsonl.keep_through(self.path, start_step, log=log)  # in place, at a line boundary: kill-safe
        if writer_class is not None:
            self.tb = _open_summary_writer(writer_class, run_dir / "tensorboard")

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


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package; run: pip install tensorboard "
            "(or set train.tensorboard=false)"
        ) from exc
    return SummaryWriter


def _open_summary_writer(writer_class, log_dir: Path):
    """The folder is checked first so an unwritable one is named with the fix, not a TensorBoard traceback."""
    ensure_writable_dir(log_dir, "train.tensorboard")
    try:
        return writer_class(str(log_dir))
    except OSError as exc:
        raise PathError(f"train.tensorboard: {describe_os_error(exc)} (or set train.tensorboard=false)") from exc


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


def read_metrics(path: str | Path, log=None) -> list[dict]:
    """The rows of metrics.jsonl; a line cut short by a crash is dropped (see moedit.utils.jsonl)."""
    return jsonl.read_rows(path, log=log)
