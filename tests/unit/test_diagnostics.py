"""Routing monitor, record file and detectors (docs/DIAGNOSTICS.md): file round trip and resume
truncation, counts that add up, deadlock and saturation detectors on constructed layers, depth profile."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moedit.config import DiagnosticsConfig, MoEConfig, RouterConfig
from moedit.diagnostics import record as rec
from moedit.diagnostics.detectors import Detectors, depth_profile, depth_third
from moedit.diagnostics.monitor import (RoutingMonitor, class_slots, flatten_routings, sample_rows_N, score_entropy,
                                       token_decisions)
from moedit.moe.layer import MoELayer
from moedit.moe.routing import Routing, RoutingContext

Y, E, T, C = 3, 4, 2, 5


def header(every: int = 1) -> dict:
    return rec.make_header([0, 2, 3], 4, E, ["softmax"] * Y, T, 3, class_slots(3, 8), every, 4)


def random_records(steps: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(len(steps), rec.to_dtype(header()["record_fields"]))
    for name in out.dtype.names[2:]:  # every float field after step, steps
        out[name] = rng.random(out[name].shape) * 100
    out["step"], out["steps"] = steps, 1
    return out


def token_rows(steps: list[int]) -> np.ndarray:
    out = np.zeros(len(steps), rec.to_dtype(header()["token_fields"]))
    out["step"], out["expert_K"] = steps, -1
    return out


def test_record_round_trip(tmp_path):
    writer = rec.RecordWriter(tmp_path / "routing", header(), start_step=0)
    first, second = random_records([1, 2, 3]), random_records([4, 5], seed=1)
    writer.append(first, token_rows([1, 1, 2]))
    writer.append(second, token_rows([5]))
    back = rec.RoutingRecord(tmp_path)
    assert back.header == header() and back.records.dtype == first.dtype
    assert np.array_equal(back.records, np.concatenate([first, second]))
    assert list(back.tokens["step"]) == [1, 1, 2, 5]


def test_resume_truncates_then_appends(tmp_path):
    writer = rec.RecordWriter(tmp_path / "routing", header(), start_step=0)
    writer.append(random_records(list(range(1, 11))), token_rows([2, 6, 7, 10]))
    writer.append_events([{"step": 5, "kind": "deadlock"}, {"step": 9, "kind": "deadlock_end"}])
    with open(writer.records_path, "ab") as f:
        f.write(b"\0" * 7)  # a record cut short by a crash
    resumed = rec.RecordWriter(tmp_path / "routing", header(), start_step=6)
    assert list(resumed.existing_records()["step"]) == [1, 2, 3, 4, 5, 6]
    resumed.append(random_records([7, 8]))
    back = rec.RoutingRecord(tmp_path)
    assert list(back.records["step"]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert list(back.tokens["step"]) == [2, 6]
    assert [e["step"] for e in back.events] == [5]


def test_changed_layout_is_moved_aside(tmp_path):
    rec.RecordWriter(tmp_path / "routing", header(), 0).append(random_records([1, 2]))
    messages = []
    rec.RecordWriter(tmp_path / "routing", header(every=2), 2, log=messages.append)
    assert (tmp_path / "routing.before_step_2" / "records.bin").stat().st_size > 0
    assert len(rec.RoutingRecord(tmp_path).records) == 0 and "another layout" in messages[0]


def test_missing_record_error_says_how_to_enable(tmp_path):
    with pytest.raises(rec.DiagnosticsError, match="diagnostics.monitor=true"):
        rec.RoutingRecord(tmp_path)


def moe_layer(num_experts: int = 4, width: int = 16, **router) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(width, MoEConfig(num_experts=num_experts, expert_ratio=1.0, router=RouterConfig(**router)))


def run_monitor(layer, cfg: DiagnosticsConfig, tmp_path, steps: int, num_classes: int = 10, B: int = 6, L: int = 5):
    monitor = RoutingMonitor(cfg, [layer], blocks=[1], depth=3, num_classes=num_classes, run_dir=tmp_path)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        t_B = torch.rand(B, generator=gen)
        labels_B = torch.randint(0, num_classes + 1, (B,), generator=gen)  # num_classes = the null label
        ctx = RoutingContext(batch=B, seq_len=L, labels_B=labels_B, null_label=num_classes, t_B=t_B)
        with torch.no_grad():
            layer(torch.randn(B, L, layer.experts.width, generator=gen), ctx)
        monitor.observe([layer.last_routing], t_B, labels_B)
        monitor.end_step(step)
    return monitor, monitor.close()


def test_counts_by_timestep_and_class_add_up(tmp_path):
    layer = moe_layer(name="expert_choice", capacity=1.5)  # tokens get 0..E experts
    cfg = DiagnosticsConfig(every=2, max_classes=3, token_samples=3, probe_every=0)
    monitor, _ = run_monitor(layer, cfg, tmp_path, steps=5)
    r = rec.RoutingRecord(tmp_path).records
    assert list(r["step"]) == [2, 4, 5] and list(r["steps"]) == [2, 2, 1]
    assert rec.RoutingRecord(tmp_path).header["class_slots"] == ["0", "1", "2", "other", "null"]
    assert np.all(r["tokens"] == r["steps"] * 30)
    assert np.array_equal(r["tokens_T"].sum(-1), r["tokens"]) and np.array_equal(r["tokens_C"].sum(-1), r["tokens"])
    assert np.array_equal(r["load_YTE"].sum(-2), r["load_YE"]) and np.array_equal(r["load_YCE"].sum(-2), r["load_YE"])
    assert np.array_equal(r["fanout_YJ"].sum(-1), r["tokens"][:, None])
    fanout_total = (r["fanout_YJ"] * np.arange(E + 1)).sum(-1)
    assert np.array_equal(fanout_total, r["load_YE"].sum(-1))  # Σ_j j·#tokens with j experts = assignments
    assert np.array_equal(r["top1_YE"].sum(-1), r["tokens"][:, None])
    tokens = rec.RoutingRecord(tmp_path).tokens
    assert len(tokens) == 2 * 3 and set(tokens["step"]) == {2, 4}  # sampled on multiples of `every` only
    assert np.all((tokens["expert_K"] >= 0).sum(-1) == np.minimum(tokens["count"], 4))


def test_token_decisions_match_the_routing():
    def routing(pairs: list[tuple[int, int, float]]) -> Routing:
        token, expert, weight = (torch.tensor(v) for v in zip(*pairs))
        return Routing(token, expert, weight.float(), num_tokens=6, num_experts=4)

    layer0 = routing([(0, 1, 0.2), (0, 3, 0.7), (2, 0, 0.5), (3, 2, 0.9), (5, 1, 0.1)])
    layer1 = routing([(0, 0, 0.1), (0, 1, 0.3), (0, 2, 0.6), (3, 3, 1.0)])  # token 2 gets no expert here
    row_N = sample_rows_N(torch.tensor([0, 2]), 6)
    count_YS, expert_YSK, weight_YSK = token_decisions(flatten_routings([layer0, layer1]), row_N, 2, 2, 4, K=2)
    assert count_YS.tolist() == [[2, 1], [3, 0]]
    assert expert_YSK.tolist() == [[[3, 1], [0, -1]], [[2, 1], [-1, -1]]]  # highest weight first, K = 2 kept
    assert torch.allclose(weight_YSK, torch.tensor([[[0.7, 0.2], [0.5, 0]], [[0.6, 0.3], [0, 0]]]))


def test_entropy_definitions():
    uniform = torch.full((2, 4), 0.25)
    assert torch.allclose(score_entropy(uniform, "softmax"), torch.ones(2))
    assert torch.allclose(score_entropy(torch.zeros(2, 4), "identity"), torch.ones(2))  # softmax(0) is uniform
    one_hot = torch.tensor([[1.0, 0, 0, 0]])
    assert score_entropy(one_hot, "sigmoid").item() == pytest.approx(0.0, abs=1e-6)


def deadlock_records(shares: list[float], start: int = 1) -> np.ndarray:
    """Layer 1 of Y sends `share` of its tokens' top-1 choices to expert 2; the others stay balanced."""
    out = np.zeros(len(shares), rec.to_dtype(header()["record_fields"]))
    out["step"], out["steps"], out["tokens"] = np.arange(start, start + len(shares)), 1, 100
    out["top1_YE"] = 25.0
    for r, share in enumerate(shares):
        out["top1_YE"][r, 1] = (100 - 100 * share) / (E - 1)
        out["top1_YE"][r, 1, 2] = 100 * share
    return out


def test_deadlock_fires_after_the_streak_not_before():
    cfg = DiagnosticsConfig(deadlock_share=0.9, deadlock_streak=5)
    detectors = Detectors(cfg, blocks=[0, 2, 3], depth=4)
    assert detectors.update(deadlock_records([0.3] * 10 + [0.95] * 4)) == []  # steps 11-14: a streak of 4
    events = detectors.update(deadlock_records([0.92, 0.99, 0.85, 0.5], start=15))  # 0.85: still held (release 0.8)
    assert [e["kind"] for e in events] == ["deadlock", "deadlock_end"]
    start, end = events
    assert (start["step"], start["start_step"], start["layer"], start["block"], start["expert"]) == (15, 11, 1, 2, 2)
    assert start["depth"] == "middle" and (end["step"], end["start_step"], end["end_step"]) == (18, 11, 17)
    summary = detectors.summary()
    assert summary["deadlock"][0]["intervals"] == [[11, 17]]
    assert summary["depth_profile"]["thirds"]["middle"] == {"deadlocked": 1, "layers": 1}


def test_deadlock_streak_counts_steps_across_multi_step_records():
    detectors = Detectors(DiagnosticsConfig(deadlock_streak=6), blocks=[0, 2, 3], depth=4)
    records = deadlock_records([0.95] * 3 + [0.4])
    records["steps"], records["step"] = 2, [2, 4, 6, 8]  # each record sums 2 steps
    events = detectors.update(records)
    assert [(e["kind"], e["step"], e["start_step"]) for e in events] == [("deadlock", 6, 1), ("deadlock_end", 8, 1)]
    assert events[1]["end_step"] == 6 and detectors.summary()["deadlock"][0]["intervals"] == [[1, 6]]


def test_depth_profile():
    blocks = list(range(9))
    assert [depth_third(b, 9) for b in (0, 2, 3, 5, 6, 8)] == ["shallow"] * 2 + ["middle"] * 2 + ["deep"] * 2
    assert depth_profile([0, 1, 8], blocks, 9)["shape"] == "U"
    assert depth_profile([4], blocks, 9)["shape"] == "middle"
    assert depth_profile([0, 4, 8], blocks, 9)["shape"] == "even"
    assert depth_profile([], blocks, 9)["shape"] == "none"
    interleaved = depth_profile([1, 3, 5], [1, 3, 5, 7], 8)["thirds"]  # thirds of 8 blocks: 0-2, 3-5, 6-7
    assert interleaved["middle"] == {"deadlocked": 2, "layers": 2}
    assert interleaved["deep"] == {"deadlocked": 0, "layers": 1}


def homogenised(layer: MoELayer) -> MoELayer:
    """Every expert a copy of expert 0 and a zero gate: uniform scores, identical outputs."""
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.copy_(p[:1].expand_as(p))
        for p in layer.router.parameters():
            p.zero_()
    return layer


@pytest.mark.parametrize("identical", [True, False])
def test_saturation_fires_only_for_uniform_scores_and_identical_experts(tmp_path, identical):
    layer = moe_layer()
    if identical:
        homogenised(layer)
    else:
        with torch.no_grad():
            for p in layer.router.parameters():
                p.zero_()  # uniform scores, but the experts stay distinct
    cfg = DiagnosticsConfig(probe_every=2, probe_tokens=8, saturation_streak=2, deadlock_streak=1000)
    _, summary = run_monitor(layer, cfg, tmp_path, steps=6)
    r = rec.RoutingRecord(tmp_path)
    assert list(r.records["probes"]) == [0, 1, 0, 1, 0, 1]
    cos = rec.probe_cos_RY(r.records)[1::2, 0]
    assert np.all(rec.entropy_RY(r.records) > 0.999)
    if identical:
        assert np.allclose(cos, 1.0, atol=1e-5)
        assert [(e["kind"], e["start_step"], e["step"]) for e in r.events] == [
            ("saturation", 2, 4), ("global_saturation", 4, 4)]
        assert summary["saturation"][0]["intervals"] == [[2, None]]
    else:
        assert np.all(cos < 0.9) and r.events == [] and summary["saturation"] == []
    assert json.loads((tmp_path / "routing" / "summary.json").read_text()) == summary
