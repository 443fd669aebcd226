"""The zoo's report on constructed result rows: means ± seed spread, the papers' orderings judged by
the documented rule, routing rows only for MoE entries, the plot written; and the shipped claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moedit.zoo import ZooError, write_report
from moedit.zoo.plan import Claim, ZooSettings, check_or_write_plan, load_claims
from moedit.zoo.report import claims_table, group, markdown, verdict

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "routers.yaml"


def fake_row(entry: str, seed: int, fd: float, kid: float, routed: bool = True, dataset: str = "mnist") -> dict:
    curve = [{"step": s, "fd_lenet": fd * 600 / s, "kid": kid, "kid_std": 0.1, "precision": 0.8, "recall": 0.5,
              "accuracy": 0.9, "eval_dir": "x"} for s in (200, 400, 600)]
    routing = {"maxvio": 0.1, "top1_share": 0.2, "entropy": 0.8, "homogenisation": 0.9, "pairs_95": 0.5,
               "mi_class_bits": 0.05, "mi_timestep_bits": 0.1, "experts_per_token": 2.0} if routed else {}
    return {"entry": entry, "dataset": dataset, "seed": seed, "curve": curve, "final": curve[-1], "routing": routing,
            "params_activated": 1_144_848, "params_router": 4096 if routed else 0, "train_wall_s": 300.0 + seed,
            "tokens_per_s": 6000.0}


def test_verdict_rule():
    assert verdict([10, 12], [20, 22]) == "agrees"  # Δ = 10 > s = 1.41 + 1.41
    assert verdict([20, 22], [10, 12]) == "disagrees"
    assert verdict([10, 14], [13, 15]) == "within seed spread"  # Δ = 2 < s = 2.83 + 1.41
    assert verdict([10], [20, 22]) == "no verdict (1 seed)"


def test_claims_table_judges_fd_and_kid_separately():
    rows = [fake_row("race", 0, 10, 1.0), fake_row("race", 1, 12, 3.0),
            fake_row("topk_linear", 0, 20, 2.0), fake_row("topk_linear", 1, 22, 2.2)]
    entries = group(rows)["mnist"]
    lines = claims_table(entries, [Claim("race", "topk_linear", "paper"), Claim("race", "absent", "x")])
    assert len(lines) == 3  # header, rule, one claim: the one naming an absent entry is left out
    assert "| race < topk_linear | paper | 11.0 ± 1.4 vs 21.0 ± 1.4 | agrees | 2.00 ± 1.41 vs 2.10 ± 0.14 | within seed spread |" == lines[2]
    assert claims_table(entries, []) == []


def test_markdown_tables_per_dataset():
    rows = [fake_row("dense", s, 30 + s, 1.0, routed=False) for s in (0, 1)] + \
           [fake_row("topk_linear", s, 20 + s, 1.0) for s in (0, 1)] + [fake_row("dense", 0, 9, 0.5, False, "fashion_mnist")]
    md = markdown(rows, {"steps": 600, "eval_n": 300, "sampler_steps": 20, "cfg_scale": 2.0, "eval_seed": 0}, "cpu",
                  [Claim("dense", "topk_linear", "DiffMoE")])
    mnist, fashion = md.split("### mnist")[1].split("### fashion_mnist")
    assert "| dense | 2 | 1.145 | 30.5 ± 0.7 |" in mnist and "| topk_linear | 2 | 1.145 (4k router) | 20.5 ± 0.7 |" in mnist
    assert mnist.count("| topk_linear |") == 2 and mnist.count("| dense |") == 1  # no routing row for dense
    assert "| dense < topk_linear | DiffMoE | 30.5 ± 0.7 vs 20.5 ± 0.7 | disagrees |" in mnist
    assert "| dense | 1 | 1.145 | 9.0 |" in fashion and "verdict" not in fashion  # one seed, one entry: no claim row


def test_write_report_from_result_files(tmp_path):
    check_or_write_plan(tmp_path, ZooSettings(steps=600, threads=3))
    for entry, seed, fd in (("topk_linear", 0, 20), ("dense", 0, 30), ("dense", 1, 31)):
        d = tmp_path / "mnist" / entry / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(fake_row(entry, seed, fd, 1.0, entry != "dense")))
    rows = write_report(tmp_path, ["dense", "topk_linear"])
    assert [(r["entry"], r["seed"]) for r in rows] == [("dense", 0), ("dense", 1), ("topk_linear", 0)]
    assert (tmp_path / "quality_vs_steps.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["steps"] == 600
    assert "3 thread(s) per run" in (tmp_path / "results.md").read_text()  # the runs' threads, not the report's
    with pytest.raises(ZooError, match="holds no zoo"):
        write_report(tmp_path / "elsewhere")


def test_shipped_claims_name_entries_and_bad_claims_are_refused(tmp_path):
    claims = load_claims(SHIPPED)
    assert Claim("race", "race_ema_plr", "Race-DiT 8.03 vs 8.95") in claims and len(claims) >= 10
    bad = tmp_path / "zoo.yaml"
    bad.write_text("entries:\n  a: x.yaml\nclaims:\n  - {better: a, worse: b, source: s}\n")
    with pytest.raises(ZooError, match="names b, not an entry"):
        load_claims(bad)
    bad.write_text("entries:\n  a: x.yaml\nclaims:\n  - {better: a, worse: a}\n")
    with pytest.raises(ZooError, match="a claim must be"):
        load_claims(bad)
