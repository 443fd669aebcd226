"""Append-only JSON-lines files (RUN/metrics.jsonl, RUN/routing/events.jsonl): one JSON object per line,
each line written with its newline in one append.

A kill or a full disk during an append can only leave the *last* line torn (cut short); readers drop it.
Cutting such a file back to a step at resume (`keep_through`) truncates it in place at a line boundary,
so a kill at any moment leaves either the old file or the cut one, never an empty or half-written one,
and the next append starts on a clean line. A line that is not JSON anywhere else is damage no crash
makes (a disk error, a hand edit): it is skipped with a message naming the file and line, since these
files are logs that the run's checkpoints and binary records do not depend on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from moedit.utils.files import atomic_write


@dataclass
class Line:
    number: int  # 1-based, as an editor shows it
    start: int  # byte offsets of the line in the file, newline included in `end`
    end: int
    raw: bytes  # without its newline
    row: dict | None  # None: blank, or not a JSON object with a numeric step (see `damaged`)

    @property
    def blank(self) -> bool:
        return not self.raw.strip()

    @property
    def damaged(self) -> bool:
        return self.row is None and not self.blank


def _parse(raw: bytes) -> dict | None:
    try:
        row = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(row, dict) or not isinstance(row.get("step", 0), (int, float)):
        return None
    return row


def scan(path: Path) -> list[Line]:
    """Every line of `path` with its byte offsets (an empty list for a missing file)."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    lines, start = [], 0
    while start < len(data):
        newline = data.find(b"\n", start)
        end = len(data) if newline < 0 else newline + 1
        raw = data[start:end].rstrip(b"\n")
        lines.append(Line(len(lines) + 1, start, end, raw, _parse(raw) if raw.strip() else None))
        start = end
    return lines


def _last_content(lines: list[Line]) -> Line | None:
    return next((line for line in reversed(lines) if not line.blank), None)


def _damage_messages(path: Path, lines: list[Line], dropped: str) -> list[str]:
    """One message per damaged line other than a torn last one (a crash explains that one)."""
    last = _last_content(lines)
    return [f"{path} line {line.number} is not a JSON row ({line.raw[:60]!r}); {dropped}"
            for line in lines if line.damaged and line is not last]


def read_rows(path: str | Path, log=None) -> list[dict]:
    """The rows of `path`: a torn last line is dropped, another damaged line skipped (log says which)."""
    path = Path(path)
    lines = scan(path)
    for message in _damage_messages(path, lines, "skipped it"):
        if log is not None:
            log(message)
    return [line.row for line in lines if line.row is not None]


def keep_through(path: str | Path, step: int, log=None) -> None:
    """Keep the rows of `path` with step ≤ `step`, drop the rest and any damaged line.

    Rows are appended in step order, so the kept rows are a prefix of the file and it is truncated in place
    at the first line not kept: nothing is rewritten. Only a file whose kept rows are not a prefix (rows out
    of order, a damaged line among kept rows) is rewritten, atomically (a temporary file replaces it).
    """
    path = Path(path)
    if not path.exists():
        return
    lines = scan(path)
    for message in _damage_messages(path, lines, "dropped it"):
        if log is not None:
            log(message)
    kept = [line.row is not None and line.row.get("step", 0) <= step for line in lines]
    cut = next((i for i, line in enumerate(lines) if not kept[i] and not line.blank), len(lines))
    if any(kept[cut:]):
        body = b"".join(line.raw + b"\n" for line, keep in zip(lines, kept) if keep)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(body))
        return
    offset = lines[cut].start if cut < len(lines) else (lines[-1].end if lines else 0)
    if offset < path.stat().st_size:
        os.truncate(path, offset)
    if cut == len(lines) and lines and lines[-1].end == lines[-1].start + len(lines[-1].raw):
        with path.open("ab") as f:  # a whole last row missing only its newline: end it, so appends start clean
            f.write(b"\n")
