"""Routing diagnostics by frame for video models (docs/DIAGNOSTICS.md): the monitor's load by frame equals a
hand count, an image model's record keeps its pre-video layout, older records still read and diagnose, and a
video record's report has the by-frame heatmap and the frame deviation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedit.config import DiagnosticsConfig, from_dict
from moedit.diagnostics import record as rec
from moedit.diagnostics.monitor import RoutingMonitor, build_monitor, class_slots
from moedit.diagnostics.report import FIGURE_NOTES, write_report
from moedit.models import build_model
from moedit.moe.routing import Routing

from test_diagnostics import header as image_header
from test_diagnostics import moe_layer, random_records, token_rows
from test_step_syncs import forbid_syncs  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# the record layout written before video models existed: an image run's record must keep exactly these
OLD_RECORD_FIELDS = ["step", "steps", "tokens", "tokens_T", "tokens_C", "load_YE", "load_YTE", "load_YCE", "top1_YE",
                     "fanout_YJ", "entropy_Y", "entropy_YT", "weight_Y", "probe_cos_Y", "probes"]
OLD_TOKEN_FIELDS = ["step", "layer", "sample", "position", "t", "label", "count", "expert_K", "weight_K"]
OLD_HEADER_KEYS = {"format", "version", "blocks", "depth", "num_experts", "score_kinds", "t_edges", "num_classes",
                   "class_slots", "every", "record_fields", "token_fields"}

B, F, S, E = 2, 2, 4, 4  # 2 clips × 2 frames × 4 tokens per frame, 4 experts
L = F * S


def crafted(assign: dict[int, list[int]]) -> Routing:
    """Token i → the listed experts (weight 1/len); tokens not listed get none."""
    pairs = [(i, e) for i, experts in assign.items() for e in experts]
    token, expert = (torch.tensor(v) for v in zip(*pairs))
    weight = torch.tensor([1.0 / len(assign[i]) for i, _ in pairs])
    return Routing(token, expert, weight, num_tokens=B * L, num_experts=E)


def hand_count(assign: dict[int, list[int]]) -> np.ndarray:
    count_FE = np.zeros((F, E))
    for i, experts in assign.items():
        frame = (i % L) // S  # token l of a sample lies in frame l // (L / F)
        for e in experts:
            count_FE[frame, e] += 1
    return count_FE


def test_load_by_frame_equals_a_hand_count(tmp_path):
    # layer 0: top-2 everywhere, frame 1 of each clip prefers experts 2, 3; layer 1: expert-choice-like, some
    # tokens get none, frame 0 only expert 0
    layer0 = {i: ([0, 1] if (i % L) < S else [2, 3]) if i % 3 else [1, 2] for i in range(B * L)}
    layer1 = {i: [0] if (i % L) < S else [1, 2, 3][: i % 4] for i in range(B * L) if (i % L) < S or i % 4}
    layers = [moe_layer(num_experts=E), moe_layer(num_experts=E)]
    cfg = DiagnosticsConfig(every=2, token_samples=4, probe_every=0)
    monitor = RoutingMonitor(cfg, layers, blocks=[0, 1], depth=2, num_classes=3, run_dir=tmp_path, frames=F)
    t_B, labels_B = torch.tensor([0.1, 0.7]), torch.tensor([0, 3])
    for step in (1, 2):
        monitor.observe([crafted(layer0), crafted(layer1)], t_B, labels_B)
        monitor.end_step(step)
    monitor.close()
    back = rec.RoutingRecord(tmp_path)
    r = back.records
    assert back.frames == F and back.header["frames"] == F and len(r) == 1
    assert r["load_YFE"].shape == (1, 2, F, E) and r["tokens_F"].tolist() == [[2 * B * S] * F]
    assert np.array_equal(r["load_YFE"][0, 0], 2 * hand_count(layer0))  # two steps in the record
    assert np.array_equal(r["load_YFE"][0, 1], 2 * hand_count(layer1))
    assert np.array_equal(r["load_YFE"].sum(-2), r["load_YE"])  # sums to the assignments per expert
    assert r["load_YFE"][0].sum((-2, -1)).tolist() == [2 * sum(map(len, a.values())) for a in (layer0, layer1)]
    tokens = back.tokens
    assert len(tokens) == 2 * 4 and np.array_equal(tokens["frame"], tokens["position"] // S)
    assert np.all((tokens["expert_K"] >= 0).sum(-1) == np.minimum(tokens["count"], 4))  # K slots not shifted
    assert np.all(tokens["count"][tokens["layer"] == 0] == 2)
    tv_RYF = rec.frame_tv_RYF(r)
    assert tv_RYF[0, 1, 0] == pytest.approx(0.5 * np.abs(np.array([1, 0, 0, 0]) - rec.load_share_RYE(r)[0, 1]).sum())


def test_an_image_model_record_keeps_its_layout(tmp_path):
    h = image_header()
    assert set(h) == OLD_HEADER_KEYS and rec.make_header([0, 2, 3], 4, 4, ["softmax"] * 3, 2, 3, class_slots(3, 8),
                                                         1, 4, frames=1) == h
    assert [f[0] for f in h["record_fields"]] == OLD_RECORD_FIELDS
    assert [f[0] for f in h["token_fields"]] == OLD_TOKEN_FIELDS
    monitor = RoutingMonitor(DiagnosticsConfig(probe_every=0), [moe_layer()], blocks=[1], depth=3, num_classes=3,
                             run_dir=tmp_path)
    assert "load_YFE" not in monitor.acc and "frames" not in monitor.header


def test_an_old_record_reads_and_diagnoses_without_frames(tmp_path):
    writer = rec.RecordWriter(tmp_path / "routing", image_header(), start_step=0)  # the pre-video layout
    writer.append(random_records([1, 2, 3, 4]), token_rows([4, 4]))
    back = rec.RoutingRecord(tmp_path)
    assert back.frames == 1 and "load_YFE" not in back.records.dtype.names
    text = write_report(tmp_path).read_text()
    out = tmp_path / "diagnostics"
    assert not (out / "load_by_frame.png").exists() and "by frame" not in text
    assert all((out / name).is_file() for name, _, _ in FIGURE_NOTES)  # depth_statistics.png included


def video_record(tmp_path, steps: int = 8) -> None:
    Y, T, classes, K, frames = 3, 2, 3, 4, 4
    h = rec.make_header([0, 2, 3], 4, E, ["softmax"] * Y, T, classes, class_slots(classes, 8), 1, K, frames=frames)
    rng = np.random.default_rng(0)
    out = np.zeros(steps, rec.to_dtype(h["record_fields"]))
    for name in out.dtype.names[2:]:
        out[name] = rng.random(out[name].shape) * 100
    out["step"], out["steps"] = np.arange(1, steps + 1), 1
    out["load_YFE"] = 100 + rng.random(out["load_YFE"].shape)  # near uniform ...
    out["load_YFE"][:, 1, 0] = [400, 0, 0, 0]  # ... but frame 0 of layer 1 sends every token to expert 0
    out["load_YE"] = out["load_YFE"].sum(-2)
    out["tokens_F"] = 100
    tokens = np.zeros(2, rec.to_dtype(h["token_fields"]))
    tokens["step"], tokens["expert_K"], tokens["frame"] = steps, -1, [0, 3]
    writer = rec.RecordWriter(tmp_path / "routing", h, start_step=0)
    writer.append(out, tokens)


def test_diagnose_a_video_record_shows_load_by_frame(tmp_path):
    video_record(tmp_path)
    text = write_report(tmp_path).read_text()
    out = tmp_path / "diagnostics"
    for name in ("load_by_frame.png", "depth_statistics.png", "depth_profile.png"):
        assert (out / name).stat().st_size > 5000 and f"({name})" in text
    assert "Video model, 4 frames" in text and "## Routing by frame" in text
    assert "Largest frame deviation: MoE layer 1 (block 2, middle), frame 0, TV 0.563" in text
    assert "frame-specialised): 1 (block 2" in text and "| position | frame |" in text


def video_model_and_monitor(tmp_path):
    cfg = from_dict({"model": {"preset": "micro", "image_size": 8, "patch_size": 2, "frames": 4, "temporal_patch": 2,
                               "in_channels": 1, "moe": {"num_experts": 4, "expert_ratio": 1.0}},
                     "diagnostics": {"probe_every": 0, "token_samples": 2}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return model, build_monitor(cfg, model, tmp_path, start_step=0)


def test_the_monitor_takes_frames_from_a_video_model(tmp_path):
    model, monitor = video_model_and_monitor(tmp_path)
    assert monitor.F == 2  # temporal token positions: 4 frames / temporal patch 2
    with torch.no_grad():
        model(torch.randn(3, *model.input_shape()), torch.rand(3), torch.randint(10, (3,)))
    monitor.observe_model(model)
    monitor.end_step(1)
    monitor.close()
    r = rec.RoutingRecord(tmp_path).records
    assert r["tokens_F"].tolist() == [[3 * 16, 3 * 16]]
    assert np.array_equal(r["load_YFE"].sum(-2), r["load_YE"])
    model.last_context.frames = 3
    with pytest.raises(ValueError, match="frames=3 but the monitor was built for frames=2"):
        monitor.observe_model(model)


def test_counting_by_frame_asks_the_device_nothing(tmp_path, forbid_syncs, monkeypatch):  # noqa: F811
    model, monitor = video_model_and_monitor(tmp_path)
    for step in (1, 2):  # step 2 samples tokens too (every = 1)
        with torch.no_grad():
            model(torch.randn(2, *model.input_shape()), torch.rand(2), torch.randint(10, (2,)))
        if step == 2:
            forbid_syncs()
        monitor.observe_model(model)
        monitor.end_step(step)
    monkeypatch.undo()  # flushing reads the device once, by design
    monitor.close()
    back = rec.RoutingRecord(tmp_path)
    assert back.records["tokens_F"].tolist() == [[32, 32]] * 2 and set(back.tokens["frame"]) <= {0, 1}
