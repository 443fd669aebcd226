"""Re-measured zoo entries merged into an earlier zoo report: the tables of docs/RESULTS.md after a change
that moves some entries only.

    python studies/zoo_merge.py --base studies/results/zoo_mnist.json --replace runs/zoo_mnist_diffmoe \
        --out runs/zoo_mnist_merged

`--base` is an earlier zoo's results.json (its rows: every run's curve, final scores, routing metrics,
timing); each `--replace` folder is a zoo root (`moedit zoo --out ... --entries ...`) whose finished runs
replace the base's runs of the same (dataset, entry). The merged zoo root at `--out` gets the base's
settings (the replacing runs must have been made with the same ones: checked) and one result.json per
run, and `moedit.zoo.write_report` writes its results.md, results.json and quality_vs_steps.png as
`moedit zoo --report-only` would (the base rows' routing metrics are kept as they were measured).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moedit.zoo import write_report
from moedit.zoo.plan import PLAN_FILE, load_claims, load_zoo_file
from moedit.zoo.runner import RESULT


def replacing_rows(root: Path, settings: dict) -> list[dict]:
    theirs = json.loads((root / PLAN_FILE).read_text())
    differ = {k: (settings.get(k), theirs.get(k)) for k in settings if k != "seeds" and theirs.get(k) != settings.get(k)}
    if differ:
        raise SystemExit(f"{root} was run with other settings than the base: {differ}")
    return [json.loads(p.read_text()) for p in sorted(root.glob(f"*/*/seed*/{RESULT}"))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="an earlier zoo's results.json")
    p.add_argument("--replace", nargs="+", required=True, help="zoo roots whose runs replace the base's")
    p.add_argument("--zoo", default="configs/zoo/routers.yaml", help="zoo file: entry order and claims")
    p.add_argument("--out", required=True, help="new folder for the merged zoo (must not exist)")
    args = p.parse_args()
    base = json.loads(Path(args.base).read_text())
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new --out")
    new = [row for root in args.replace for row in replacing_rows(Path(root), base["settings"])]
    replaced = {(r["dataset"], r["entry"]) for r in new}
    rows = [r for r in base["rows"] if (r["dataset"], r["entry"]) not in replaced] + new
    out.mkdir(parents=True)
    (out / PLAN_FILE).write_text(json.dumps(base["settings"], indent=1) + "\n")
    for row in rows:
        path = out / row["dataset"] / row["entry"] / f"seed{row['seed']}" / RESULT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=1) + "\n")
    entries, _ = load_zoo_file(args.zoo)
    write_report(out, [e.name for e in entries], load_claims(args.zoo))
    print(f"{len(rows)} runs ({len(new)} re-measured: {sorted(replaced)}) -> {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
