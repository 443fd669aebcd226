"""The zoo's plan and routing statistics on known inputs: the shipped zoo file holds equal activated
parameters, unequal ones and bad files are refused with the fix named, a resumed zoo must keep its
settings, and the mutual information / pair-share statistics give their analytic values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moedit.zoo.plan import (ZooError, ZooSettings, activated_table, check_or_write_plan, load_zoo_file,
                             plan_runs, run_config, select_entries)
from moedit.zoo.routing_stats import mutual_information_bits, pair_share

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "zoo" / "routers.yaml"


def test_shipped_zoo_has_every_method_at_equal_activated_parameters():
    entries, gap = load_zoo_file(SHIPPED)
    names = {e.name for e in entries}
    assert {"dense", "topk_linear", "topk_mlp", "topk_cross_attn", "expert_choice", "diffmoe", "race_identity",
            "race_ema", "race_ema_plr", "race", "promoe_no_contrastive", "promoe", "deepseek_style"} == names
    counts, table = activated_table(entries, gap)
    ref = counts["dense"].activated_without_router
    assert all(abs(c.activated_without_router / ref - 1) <= 0.02 for c in counts.values())
    assert "deepseek_style" in table and "+0.09%" in table


def test_shipped_entries_set_what_their_names_say(tmp_path):
    entries = {e.name: e for e in load_zoo_file(SHIPPED)[0]}
    settings = ZooSettings(steps=30, curve_points=3)
    cfg = {name: run_config(run, settings) for name, run in
           ((r.entry.name, r) for r in plan_runs(list(entries.values()), ["fashion_mnist"], [3], tmp_path))}
    assert cfg["dense"].model.moe is None and cfg["topk_cross_attn"].model.moe.router.gate == "cross_attn"
    ident, ema, plr, full = cfg["race_identity"], cfg["race_ema"], cfg["race_ema_plr"], cfg["race"]
    assert not ident.model.moe.router.ema_threshold and ema.model.moe.router.ema_threshold
    assert not ema.model.moe.router.target_head and plr.model.moe.router.target_head
    assert ident.train.aux_weights["similarity"] == plr.train.aux_weights["similarity"] == 0
    assert full.train.aux_weights["similarity"] > 0 and full.train.aux_weights["plr"] > 0
    assert cfg["promoe_no_contrastive"].train.aux_weights["contrastive"] == 0
    for c in cfg.values():  # the zoo's shared settings reach every run
        assert (c.data.name, c.seed, c.train.steps, c.train.ckpt_every, c.train.keep_last) == ("fashion_mnist", 3, 30, 10, 3)
        assert c.sample.steps == settings.sampler_steps and c.sample.cfg_scale == settings.cfg_scale
        assert (c.train.lr, c.train.betas) == (2e-3, [0.9, 0.999])  # the recipe the zoo was measured with


def _zoo_file(tmp_path, text: str) -> Path:
    (tmp_path / "base.yaml").write_text((ROOT / "configs" / "quickstart.yaml").read_text())
    path = tmp_path / "zoo.yaml"
    path.write_text(text)
    return path


def test_unequal_activated_parameters_are_refused_with_the_fix(tmp_path):
    path = _zoo_file(tmp_path, "entries:\n  a: {config: base.yaml}\n  wide: {config: base.yaml, set: [model.moe.router.top_k=3]}\n")
    entries, gap = load_zoo_file(path)
    with pytest.raises(ZooError, match=r"wide \(\+.*expert_ratio"):
        activated_table(entries, gap)
    loose = _zoo_file(tmp_path, "max_param_gap: 0.5\nentries:\n  a: base.yaml\n  wide: {config: base.yaml, set: [model.moe.router.top_k=3]}\n")
    activated_table(*load_zoo_file(loose))  # the gap is the zoo file's to choose


def test_a_zoo_wide_set_reaches_every_entry_before_its_own(tmp_path):
    path = _zoo_file(tmp_path, "set: [train.lr=1e-3, train.warmup_steps=7]\nentries:\n  a: base.yaml\n"
                               "  b: {config: base.yaml, set: [train.lr=5e-4]}\n")
    runs = plan_runs(load_zoo_file(path)[0], ["mnist"], [0], tmp_path / "zoo")
    cfg = {r.entry.name: run_config(r, ZooSettings(steps=30, curve_points=3)) for r in runs}
    assert (cfg["a"].train.lr, cfg["b"].train.lr) == (1e-3, 5e-4)
    assert cfg["a"].train.warmup_steps == cfg["b"].train.warmup_steps == 7


@pytest.mark.parametrize("text, match", [
    ("entries: {}\n", "must hold `entries:`"),
    ("set: train.lr=1e-3\nentries:\n  a: base.yaml\n", "top-level `set:` must be a list"),
    ("entries:\n  a: {config: base.yaml}\nsteps: 3\n", "found keys"),
    ("entries:\n  a: {config: base.yaml, sett: []}\n", "entry 'a' must be"),
    ("entries:\n  a: {config: missing.yaml}\n", "not a file"),
])
def test_bad_zoo_files_say_what_is_wrong(tmp_path, text, match):
    with pytest.raises(ZooError, match=match):
        load_zoo_file(_zoo_file(tmp_path, text))


def test_missing_zoo_file_and_unknown_entry(tmp_path):
    with pytest.raises(ZooError, match="routers.yaml"):
        load_zoo_file(tmp_path / "nope.yaml")
    with pytest.raises(ZooError, match="no zoo entries named typo.*dense"):
        select_entries(load_zoo_file(SHIPPED)[0], ["dense", "typo"])


def test_bad_settings_and_datasets_are_refused(tmp_path):
    with pytest.raises(ZooError, match="multiple of curve_points"):
        ZooSettings(steps=100, curve_points=3)
    with pytest.raises(ZooError, match="multiple of the 10 classes"):
        ZooSettings(eval_n=25)
    entries = load_zoo_file(SHIPPED)[0][:1]
    with pytest.raises(ZooError, match="cifar"):
        plan_runs(entries, ["cifar"], [0], tmp_path)
    with pytest.raises(ZooError, match="seeds"):
        plan_runs(entries, ["mnist"], [], tmp_path)


def test_plan_order_and_directories(tmp_path):
    entries = load_zoo_file(SHIPPED)[0][:2]
    runs = plan_runs(entries, ["mnist", "fashion_mnist"], [0, 1], tmp_path)
    assert [(r.dataset, r.seed, r.entry.name) for r in runs[:3]] == [("mnist", 0, "dense"), ("mnist", 0, "topk_linear"),
                                                                     ("mnist", 1, "dense")]
    assert runs[-1].run_dir == tmp_path / "fashion_mnist" / "topk_linear" / "seed1"


def test_a_resumed_zoo_keeps_its_settings(tmp_path):
    check_or_write_plan(tmp_path, ZooSettings(steps=300))
    check_or_write_plan(tmp_path, ZooSettings(steps=300))  # the same settings continue
    before = (tmp_path / "zoo.json").read_text()
    with pytest.raises(ZooError, match=r"steps: 300 there, 600 now.*Nothing was changed"):
        check_or_write_plan(tmp_path, ZooSettings(steps=600))
    assert (tmp_path / "zoo.json").read_text() == before and json.loads(before)["steps"] == 300


def test_mutual_information_known_values():
    assert mutual_information_bits(np.full((4, 8), 5.0)) == pytest.approx(0.0, abs=1e-12)  # independent
    assert mutual_information_bits(np.eye(4) * 7) == pytest.approx(2.0)  # expert = class: log2 4 bits
    # class c to experts {2c, 2c+1} evenly: I = H(class) = 2 bits, whatever the expert count
    joint = np.zeros((4, 8))
    for c in range(4):
        joint[c, 2 * c: 2 * c + 2] = 3
    assert mutual_information_bits(joint) == pytest.approx(2.0)
    assert np.isnan(mutual_information_bits(np.zeros((2, 2))))


def test_pair_share_known_values():
    one_pair = np.array([[0, 1], [1, 0], [0, 1]])
    assert pair_share(one_pair, 8) == pytest.approx(1 / 28)
    all_pairs = np.array([[i, j] for i in range(8) for j in range(i + 1, 8)])
    assert pair_share(all_pairs, 8) == pytest.approx(27 / 28)  # equal counts: 27 of 28 hold ≥ 95%
    # three experts per token give three pairs; -1 slots and top-1 tokens give none
    assert pair_share(np.array([[0, 1, 2, -1]] * 5), 4) == pytest.approx(3 / 6)
    assert pair_share(np.array([[3, -1], [2, -1]]), 4) is None


def test_speed_of_a_budget_shorter_than_two_log_windows(tmp_path):
    """One metrics row gives no window: the segments' own rates stand in, so the row is still timed."""
    from moedit.zoo.runner import speed

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 20, "elapsed_s": 2.0}) + "\n")
    segments = [{"train_wall_s": 2.5, "img_per_s": 512.0, "load_5min": 0.1}]
    got = speed(tmp_path, segments, ZooSettings(steps=20, curve_points=1), batch_size=64, tokens_per_image=49)
    assert got["tokens_per_s"] == 512.0 * 49 and got["train_wall_s"] == 20 * 64 / 512.0
    assert speed(tmp_path, [], ZooSettings(steps=20, curve_points=1), 64, 49)["tokens_per_s"] is None
