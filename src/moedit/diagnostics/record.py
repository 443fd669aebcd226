"""The routing record: an append-only binary time series in RUN/routing/, readable with numpy memmap.

    routing/header.json   the layout: record and token dtypes (numpy field lists), the MoE layers'
                          block indices, expert count, timestep bucket edges, class slot names,
                          and for a video model its frames (temporal token positions)
    routing/records.bin   one fixed-size record per `diagnostics.every` optimizer steps, appended
    routing/tokens.bin    sampled raw token decisions, one fixed-size row per (token, layer), appended
    routing/events.jsonl  detector events (deadlock / saturation start and end), one JSON per line
    routing/summary.json  the detectors' end-of-training summary

Shape legend for the record fields: Y MoE layers (in block order), E routed experts, T timestep
buckets, C class slots (labels 0..c−1, then "other" when the label set is capped, then "null"),
J = E + 1 fan-out bins (tokens with 0..E experts), K token slots, F frames (temporal token positions
of a video model; the fields with F, `tokens_F` and `load_YFE`, the header's `frames` and the token
rows' `frame` exist only when F > 1, so an image model's record is the one written before video
models existed). Every float field is a *sum* over
the record's steps, micro-batches and data-parallel ranks, so records add up and are all-reduced
with one SUM; means are formed when read (`tokens`, `probes` are the denominators).

Records are in step order; resuming at step s truncates both .bin files to the rows with step ≤ s
and events.jsonl to the events detected at step ≤ s, then appends. Truncation is in place at a row
or line boundary and the JSON files are replaced atomically, so a kill or a full disk at any moment
leaves a record that resumes and reads (RecordWriter, RoutingRecord say what is tolerated).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moedit.utils import jsonl
from moedit.utils.files import atomic_write_text

FORMAT = "moedit-routing"
VERSION = 1
TOKEN_SLOTS = 8  # a sampled token keeps its K = min(E, 8) highest-weight experts (race may give it E)


class DiagnosticsError(RuntimeError):
    """A run directory cannot be diagnosed; the message says why and what to do."""


def record_fields(Y: int, E: int, T: int, C: int, F: int = 1) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, numpy type, shape) of one record; see the module docstring for the legend."""
    f4 = "<f4"
    by_frame = [("tokens_F", f4, (F,)),  # tokens per frame (token l of a sample is in frame l // (L / F))
                ("load_YFE", f4, (Y, F, E))] if F > 1 else []  # assignments per (frame, expert)
    return [
        ("step", "<i4", ()),  # last optimizer step in the record (1-based, as metrics.jsonl)
        ("steps", "<i4", ()),  # optimizer steps summed into it
        ("tokens", f4, ()),  # tokens routed per layer
        ("tokens_T", f4, (T,)),
        ("tokens_C", f4, (C,)),
        ("load_YE", f4, (Y, E)),  # assignments (token, expert) per expert
        ("load_YTE", f4, (Y, T, E)),
        ("load_YCE", f4, (Y, C, E)),
        ("top1_YE", f4, (Y, E)),  # tokens whose highest raw score is expert e
        ("fanout_YJ", f4, (Y, E + 1)),  # tokens that got j experts, j = 0..E
        ("entropy_Y", f4, (Y,)),  # Σ over tokens of the normalised score entropy
        ("entropy_YT", f4, (Y, T)),
        ("weight_Y", f4, (Y,)),  # Σ over assignments of the combine weight
        ("probe_cos_Y", f4, (Y,)),  # Σ over probes of the experts' mean pairwise output cosine
        ("probes", f4, ()),  # probes summed (0 in a record without one)
    ] + by_frame


def token_fields(K: int, F: int = 1) -> list[tuple[str, str, tuple[int, ...]]]:
    return [
        ("step", "<i4", ()), ("layer", "<i4", ()), ("sample", "<i4", ()), ("position", "<i4", ()),
        ("t", "<f4", ()), ("label", "<i4", ()),
        ("count", "<i4", ()),  # experts the token got (may exceed K; the K highest weights are kept)
        ("expert_K", "<i4", (K,)),  # −1 = empty slot
        ("weight_K", "<f4", (K,)),
    ] + ([("frame", "<i4", ())] if F > 1 else [])  # video: the token's frame (temporal position)


def to_dtype(fields: list) -> np.dtype:
    return np.dtype([(name, kind, tuple(shape)) for name, kind, shape in fields])


def make_header(blocks: list[int], depth: int, num_experts: int, score_kinds: list[str], t_buckets: int,
                num_classes: int, class_slots: list[str], every: int, token_slots: int, frames: int = 1) -> dict:
    """`frames` (temporal token positions) is stored only when > 1: an image model's header is unchanged, so
    a run recorded before video models existed resumes into its own record."""
    Y, E, T, C, F = len(blocks), num_experts, t_buckets, len(class_slots), frames
    return {
        "format": FORMAT, "version": VERSION,
        "blocks": blocks, "depth": depth, "num_experts": E, "score_kinds": score_kinds,
        "t_edges": [i / T for i in range(T + 1)], "num_classes": num_classes, "class_slots": class_slots,
        "every": every, **({"frames": F} if F > 1 else {}),
        "record_fields": [[n, k, list(s)] for n, k, s in record_fields(Y, E, T, C, F)],
        "token_fields": [[n, k, list(s)] for n, k, s in token_fields(token_slots, F)],
    }


def _read_rows(path: Path, dtype: np.dtype) -> np.ndarray:
    """Every whole row of `path` as a read-only memmap (an empty array for a missing or empty file)."""
    rows = path.stat().st_size // dtype.itemsize if path.exists() else 0
    if rows == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(rows,))


def _truncate_rows(path: Path, dtype: np.dtype, keep_through_step: int) -> None:
    rows = _read_rows(path, dtype)
    keep = int(np.searchsorted(rows["step"], keep_through_step, side="right")) if len(rows) else 0
    del rows  # release the memmap before truncating its file
    if path.exists():
        os.truncate(path, keep * dtype.itemsize)  # also drops a partial row left by a crash


def _load_json(path: Path) -> tuple[object, str | None]:
    """(value, None), or (None, why it cannot be read): a kill during an older moedit's in-place write
    could leave a file empty or cut short."""
    try:
        return json.loads(path.read_bytes()), None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, ("it is empty" if path.stat().st_size == 0 else f"it is not valid JSON ({exc})")


def _load_header(path: Path) -> tuple[dict | None, str | None]:
    header, problem = _load_json(path)
    if problem is None and not isinstance(header, dict):
        return None, "it is not a JSON object"
    return header, problem


def _rows_fit(path: Path, dtype: np.dtype) -> bool:
    """Could `path` have been written with rows of `dtype`? Whole rows only, steps in order (rows of another
    layout read at this one's stride give misplaced, unordered steps)."""
    if not path.exists():
        return True
    if path.stat().st_size % dtype.itemsize:
        return False
    steps = np.asarray(_read_rows(path, dtype)["step"])
    return bool(np.all(steps >= 1) and np.all(np.diff(steps) >= 0))


def _fits_header(directory: Path, header: dict) -> bool:
    return (_rows_fit(directory / "records.bin", to_dtype(header["record_fields"]))
            and _rows_fit(directory / "tokens.bin", to_dtype(header["token_fields"])))


def _move_aside(directory: Path, start_step: int) -> Path:
    aside = directory.with_name(f"routing.before_step_{start_step}")
    while aside.exists():  # resumed at the same step before: keep every earlier record
        aside = aside.with_name(aside.name + "_")
    os.replace(directory, aside)
    return aside


class RecordWriter:
    """Appends records and token rows (rank 0 only). Opening continues a run's record: rows after
    `start_step` are dropped (a resumed run repeats them); a record of another layout is moved aside.

    Every change made on opening survives a kill at any moment: the .bin files and events.jsonl are cut in
    place at a row or line boundary (which also drops a row or line torn by a crash), and header.json is
    replaced atomically. The header is fully determined by the settings and the model, so an unreadable
    one is rebuilt when the records fit it, and the directory is moved aside when they do not."""

    def __init__(self, directory: Path, header: dict, start_step: int, log=print):
        self.dir = Path(directory)
        self.record_dtype = to_dtype(header["record_fields"])
        self.token_dtype = to_dtype(header["token_fields"])
        header_path = self.dir / "header.json"
        old = self._check_existing(header_path, header, start_step, log)
        self.dir.mkdir(parents=True, exist_ok=True)
        if old != header:
            atomic_write_text(header_path, json.dumps(header, indent=1))
        _truncate_rows(self.records_path, self.record_dtype, start_step)
        _truncate_rows(self.tokens_path, self.token_dtype, start_step)
        jsonl.keep_through(self.events_path, start_step, log=lambda m: log(f"routing monitor: {m}"))

    def _check_existing(self, header_path: Path, header: dict, start_step: int, log) -> dict | None:
        """The header on disk once this returns (None: none), after moving aside a record of another layout."""
        if not header_path.exists():
            return None
        old, problem = _load_header(header_path)
        if problem is None and old == header:
            return old
        if problem is not None and _fits_header(self.dir, header):
            log(f"routing monitor: {header_path} was unreadable ({problem}); rebuilt it from the current "
                f"settings and kept the {len(self.existing_records())} records of {self.records_path}")
            return None
        reason = ("diagnostics or model settings changed" if problem is None else
                  f"its header was unreadable ({problem}) and the records do not fit the current settings")
        aside = _move_aside(self.dir, start_step)
        log(f"routing monitor: {self.dir} has another layout ({reason}); moved it to {aside} and started a "
            "new record")
        return None

    @property
    def records_path(self) -> Path:
        return self.dir / "records.bin"

    @property
    def tokens_path(self) -> Path:
        return self.dir / "tokens.bin"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    def existing_records(self) -> np.ndarray:
        return _read_rows(self.records_path, self.record_dtype)

    def append(self, records: np.ndarray, tokens: np.ndarray | None = None) -> None:
        with self.records_path.open("ab") as f:
            f.write(np.ascontiguousarray(records, self.record_dtype).tobytes())
        if tokens is not None and len(tokens):
            with self.tokens_path.open("ab") as f:
                f.write(np.ascontiguousarray(tokens, self.token_dtype).tobytes())

    def append_events(self, events: list[dict]) -> None:
        if events:
            with self.events_path.open("a") as f:
                f.writelines(json.dumps(e) + "\n" for e in events)

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=1))


class RoutingRecord:
    """A run's routing record, read back: header, records and tokens (memmaps), events, summary.

    What a kill can leave behind reads cleanly: a partial last row of a .bin file and a torn last line of
    events.jsonl are ignored. A damaged events line elsewhere, or a damaged summary.json (it is rewritten at
    the end of training), is skipped with a message in `notes`; a damaged header cannot be worked around
    (it gives the records' layout) and raises DiagnosticsError saying how to rebuild it."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "routing"
        self.notes: list[str] = []  # damage that was skipped, for the report and the user
        self.header = self._read_header(run_dir)
        self.records = _read_rows(self.dir / "records.bin", to_dtype(self.header["record_fields"]))
        self.tokens = _read_rows(self.dir / "tokens.bin", to_dtype(self.header["token_fields"]))
        self.events = jsonl.read_rows(self.dir / "events.jsonl", log=self.notes.append)
        self.summary = self._read_summary()

    def _read_header(self, run_dir) -> dict:
        header_path = self.dir / "header.json"
        if not header_path.exists():
            raise DiagnosticsError(
                f"{run_dir} has no routing record ({header_path} is missing). The monitor records MoE runs "
                "trained with diagnostics.monitor=true (the default); train with it on, e.g. "
                "`moedit train -c configs/quickstart.yaml --set diagnostics.monitor=true`.")
        header, problem = _load_header(header_path)
        if problem is not None:
            config = Path(run_dir) / "config.yaml"
            raise DiagnosticsError(
                f"{header_path} is damaged: {problem}. It holds the layout of the records, so they cannot be "
                f"read without it. Rebuild it with `moedit train -c {config} --resume` (the same config the run "
                "was trained with; it keeps the records when they fit and trains no steps if the run is "
                "finished), then run `moedit diagnose` again.")
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise DiagnosticsError(f"{header_path} is not a {FORMAT} v{VERSION} header; this moedit cannot read it")
        return header

    def _read_summary(self) -> dict | None:
        path = self.dir / "summary.json"
        if not path.exists():
            return None
        summary, problem = _load_json(path)
        if problem is None and isinstance(summary, dict):
            return summary
        self.notes.append(f"{path} is damaged ({problem or 'it is not a JSON object'}); ignored it. It is "
                          "rewritten at the end of training (`moedit train --resume` of the run does it).")
        return None

    @property
    def blocks(self) -> list[int]:
        return self.header["blocks"]

    @property
    def frames(self) -> int:
        """Temporal token positions: 1 for image models and for records written before video models."""
        return frames_of(self.header, self.records)


def frames_of(header: dict, records: np.ndarray) -> int:
    """F of a record: > 1 only for a video run whose records hold load_YFE (an older record has none)."""
    has_fields = records.dtype.names is not None and "load_YFE" in records.dtype.names
    return int(header.get("frames", 1)) if has_fields else 1


# ----------------------------------------------------------------------------- derived series


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def top1_share_RY(records: np.ndarray) -> np.ndarray:
    """Share of tokens whose highest-scoring expert is the layer's most chosen one (deadlock ≥ 0.9)."""
    top1 = records["top1_YE"].astype(np.float64)
    return ratio(top1.max(-1), top1.sum(-1))


def load_share_RYE(records: np.ndarray) -> np.ndarray:
    load = records["load_YE"].astype(np.float64)
    return ratio(load, load.sum(-1, keepdims=True))


def minority_share_RY(records: np.ndarray) -> np.ndarray:
    """Share of the assignments taken by the least-loaded expert (0 when an expert got none)."""
    return load_share_RYE(records).min(-1)


def entropy_RY(records: np.ndarray) -> np.ndarray:
    return ratio(records["entropy_Y"], records["tokens"][:, None])


def probe_cos_RY(records: np.ndarray) -> np.ndarray:
    """Mean pairwise cosine of the experts' outputs; NaN in records without a probe."""
    return ratio(records["probe_cos_Y"], records["probes"][:, None])


def weight_mean_RY(records: np.ndarray) -> np.ndarray:
    return ratio(records["weight_Y"], records["load_YE"].sum(-1))


def experts_per_token_RY(records: np.ndarray) -> np.ndarray:
    return ratio(records["load_YE"].sum(-1), records["tokens"][:, None])


def zero_expert_share_RY(records: np.ndarray) -> np.ndarray:
    """Share of tokens that got no routed expert (expert choice, race and DiffMoE allow it)."""
    return ratio(records["fanout_YJ"][..., 0], records["tokens"][:, None])


def frame_share_RYFE(records: np.ndarray) -> np.ndarray:
    """Each (frame, expert)'s share of the layer's assignments (sums to 1 over F×E); uniform = 1/(F·E)."""
    load = records["load_YFE"].astype(np.float64)
    return ratio(load, load.sum((-2, -1), keepdims=True))


def frame_tv_RYF(records: np.ndarray) -> np.ndarray:
    """Total-variation distance ½ Σ_e |q_fe − p_e| between frame f's expert distribution q_f (its
    assignments' shares) and the layer's distribution p over all frames: 0 = the frame routes like the
    layer, 1 = disjoint experts. NaN for a frame without assignments."""
    load = records["load_YFE"].astype(np.float64)
    q = ratio(load, load.sum(-1, keepdims=True))
    p = ratio(load.sum(-2), load.sum((-2, -1))[..., None])[..., None, :]
    return 0.5 * np.abs(q - p).sum(-1)  # NaN rows stay NaN
