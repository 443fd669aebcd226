"""Where a study's results go: the same record as JSON (for tools) and Markdown (for docs), side by side."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, result: dict, text: str) -> None:
    """Write `result` to out.json and `text` to out.md (creating the folder), and print `text`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
