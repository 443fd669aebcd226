"""`moedit plan` / moedit.distributed.planner: exact per-rank parameter and state bytes against a direct
computation from the meta model (torch.chunk of meta tensors as the expert split and FSDP2 do it, along
the dimension parallelize.shard_dim picks, as every fully_shard unit's shard_placement_fn does),
the scaling of the traffic estimates, the ordering of the checkpointing modes, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moedit.cli.main import main as cli_main
from moedit.config import ConfigError, apply_overrides, from_dict, load_config
from moedit.distributed import planner
from moedit.distributed.parallelize import shard_dim
from moedit.distributed.planner import Hardware, Layout, parse_memory, plan
from moedit.models import build_model

QUICKSTART = "configs/quickstart.yaml"  # tiny: depth 4, width 128, 8 routed experts top-2 + 1 shared
PROMOE = "configs/router_promoe.yaml"  # the quickstart with ProMoE: 8 + 1 unconditional routed experts
GIB80 = 80 * 2 ** 30


def hw(gpus: int, **kw) -> Hardware:
    return Hardware(gpus=gpus, gpu_memory=GIB80, **kw)


def row(result, layout: str, mode: str = "none"):
    (found,) = [r for r in result.rows if r.layout == layout and r.checkpointing == mode]
    return found


# ----------------------------------------------------------------------------- the direct computation


def meta_params(cfg) -> list[tuple[str, torch.Tensor, int | None]]:
    """(name, meta tensor, E if a stacked routed-expert tensor else None) of every parameter."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    out = []
    for name, p in model.named_parameters():
        E = None
        if ".moe.experts." in name:
            E = model.blocks[int(name.split(".")[1])].moe.experts.num_experts
        out.append((name, p.detach(), E))
    return out


def padded_shard(t: torch.Tensor, group: int) -> int:
    """FSDP2 with parallelize's placement: the tensor chunked along shard_dim over `group` ranks, every rank
    padded to the first (largest) chunk."""
    if t.dim() == 0:
        return 1
    return t.chunk(group, shard_dim(tuple(t.shape), group))[0].numel()


def direct_per_rank(cfg, data: str, ep: int, gpus: int) -> tuple[int, int]:
    dense = routed = 0
    for _, t, E in meta_params(cfg):
        if data == "ddp":
            n = t.numel()
        elif E is not None and ep > 1:
            local = t.chunk(ep, 0)[0]  # the expert split of rank 0 (torch.chunk, as DTensor Shard(0))
            n = padded_shard(local, gpus // ep)
        else:
            n = padded_shard(t, gpus)
        if E is not None:
            routed += n
        else:
            dense += n
    return dense, routed


CASES = [  # config, gpus, layout (data, ep), what it covers
    (QUICKSTART, 4, ("ddp", 1), "replicated"),
    (QUICKSTART, 3, ("fsdp", 1), "dim-0 padding of dense tensors (128/3)"),
    (QUICKSTART, 16, ("fsdp", 1), "8 experts over 16 ranks: largest dim"),
    (QUICKSTART, 4, ("fsdp", 2), "4 local experts over efsdp 2: dim 0"),
    (QUICKSTART, 16, ("fsdp", 2), "4 local experts < efsdp 8: largest dim"),
    (QUICKSTART, 8, ("fsdp", 8), "one local expert, efsdp 1"),
    (QUICKSTART, 12, ("fsdp", 3), "8 routed over ep 3: 3 local < efsdp 4: largest dim"),
    (PROMOE, 4, ("fsdp", 2), "9 routed: 5 on the first ep rank, padded to 3 over efsdp 2"),
    (PROMOE, 12, ("fsdp", 3), "9 routed over ep 3: 3 local < efsdp 4: largest dim"),
]


@pytest.mark.parametrize("path,gpus,layout,what", CASES, ids=[c[3] for c in CASES])
def test_params_and_state_per_rank_are_exact(path, gpus, layout, what):
    cfg = load_config(path)
    result = plan(cfg, hw(gpus))
    name = Layout(*layout).name
    r = row(result, name)
    dense, routed = direct_per_rank(cfg, *layout, gpus)
    assert (r.params_dense, r.params_routed) == (dense, routed)
    assert r.params_bytes == 4 * (dense + routed)
    assert r.state_bytes == (24 if layout[0] == "ddp" else 20) * (dense + routed)
    # the same for every checkpointing mode
    assert {(x.params_dense, x.params_routed, x.state_bytes) for x in result.rows if x.layout == name} == \
        {(dense, routed, r.state_bytes)}


def test_ddp_holds_every_parameter_and_fsdp_shards_them():
    cfg = load_config(QUICKSTART)
    total = sum(t.numel() for _, t, _ in meta_params(cfg))
    result = plan(cfg, hw(4))
    assert row(result, "ddp").params_per_rank == total == result.model["total_params"]
    assert total / 4 < row(result, "fsdp").params_per_rank < total / 2
    # a shared expert's (1, D, H) tensors are split along their largest dim, not held whole by rank 0
    facts = planner.model_facts(cfg)
    shared = [p for p in facts.params if ".moe.shared." in p.name]
    assert shared and all(planner.numel_per_rank(p, Layout("fsdp"), 4) < p.numel for p in shared)


def test_shared_expert_is_split_along_its_largest_dim():
    # DiT-MoE-S/2: one shared SwiGLU expert of D 384, H 768: w1/wu (1, D, H), w2 (1, H, D) over 8 ranks
    cfg = from_dict(apply_overrides({"model": {"preset": "DiT-MoE-S/2-8E2A"}}, []))
    facts = {p.name: p for p in planner.model_facts(cfg).params}
    seen = set()
    for name, t, _ in meta_params(cfg):
        if not name.startswith("blocks.0.moe.shared.") or t.dim() != 3:
            continue
        largest = 2 if name.endswith("_EDH") else 1  # H = 768 > D = 384
        assert t.shape[0] == 1 and t.shape[largest] == 768
        assert shard_dim(tuple(t.shape), 8) == largest
        expected = t.chunk(8, largest)[0].numel()  # 1·384·96
        assert expected == t.numel() // 8 < t.chunk(8, 0)[0].numel() == t.numel()  # dim 0: whole on rank 0
        for layout in (Layout("fsdp"), Layout("fsdp", 2)):  # dense: sharded over all 8 ranks under ep too
            assert planner.numel_per_rank(facts[name], layout, 8) == expected
        seen.add(name.rsplit(".", 1)[1])
    assert seen == {"w1_EDH", "wu_EDH", "w2_EHD"}


def test_no_uneven_note_unless_a_split_exceeds_one_row():
    preset = from_dict(apply_overrides({"model": {"preset": "DiT-MoE-XL/2-8E2A"}}, ["train.batch_size=32"]))
    assert not any("even split" in n for n in plan(preset, hw(8)).notes)
    # 8 experts over ep 3 split 3/3/2: rank 0's 3 local experts hold more than an even share
    notes = [n for n in plan(load_config(QUICKSTART), hw(12)).notes if "even split" in n]
    assert len(notes) == 1 and notes[0].startswith("fsdp+ep 3:") and "moe.experts" in notes[0]


def test_promoe_counts_its_unconditional_expert():
    facts = planner.model_facts(load_config(PROMOE))
    assert facts.routed_experts == 8 + 1
    assert facts.routed_experts == planner.model_facts(load_config(QUICKSTART)).routed_experts + 1


def test_expert_split_is_the_meshs():
    from moedit.distributed.mesh import expert_ranges

    for E in (1, 8, 9, 13, 32):
        for P in range(1, E + 1):
            assert planner.expert_split(E, P) == [end - start for start, end in expert_ranges(E, P)]


def test_layouts_offered_and_refused():
    result = plan(load_config(PROMOE), hw(8))  # 9 routed experts: ep 2 and ep 4 divide 8 ...
    assert sorted({r.layout for r in result.rows}) == ["ddp", "fsdp", "fsdp+ep 2"]
    assert any("fsdp+ep 4" in n and "without" in n for n in result.notes)  # ... 3/3/3/0 leaves one empty
    quick = plan(load_config(QUICKSTART), hw(6))  # 8 experts on 6 GPUs: ep 3 splits 3/3/2, ep 6 2/2/2/2/0/0
    assert {r.layout for r in quick.rows} == {"ddp", "fsdp", "fsdp+ep 2", "fsdp+ep 3"}
    assert any("fsdp+ep 6" in n for n in quick.notes)
    dense = plan(load_config("configs/dense_quickstart.yaml"), hw(4))
    assert {(r.layout, r.checkpointing) for r in dense.rows} == {
        ("ddp", "none"), ("ddp", "full"), ("fsdp", "none"), ("fsdp", "full")}
    configured = [r for r in result.rows if r.configured]
    assert [(r.layout, r.checkpointing) for r in configured] == [("ddp", "none")]


def test_configured_layout_is_marked():
    cfg = load_config(QUICKSTART, ["parallel.data=fsdp", "parallel.ep=4", "parallel.activation_checkpointing=full"])
    assert [(r.layout, r.checkpointing) for r in plan(cfg, hw(8)).rows if r.configured] == [("fsdp+ep 4", "full")]


# ----------------------------------------------------------------------------- estimates


def test_all_to_all_scales_with_ep_layers_and_accumulation():
    base = plan(load_config(QUICKSTART), hw(8))
    a2 = row(base, "fsdp+ep 2").all_to_all_bytes
    a4 = row(base, "fsdp+ep 4").all_to_all_bytes
    a8 = row(base, "fsdp+ep 8").all_to_all_bytes
    assert a4 / a2 == pytest.approx((3 / 4) / (1 / 2)) and a8 / a2 == pytest.approx((7 / 8) / (1 / 2))
    assert row(base, "fsdp").all_to_all_bytes == row(base, "ddp").all_to_all_bytes == 0
    # the formula: 4 exchanges of M·D·2 B, (P−1)/P of them leaving, per MoE layer
    T, D, k = 64 * 49, 128, 2
    assert a2 == 4 * T * k * D * 2 * (1 / 2) * 4
    deeper = plan(load_config(QUICKSTART, ["model.depth=8"]), hw(8))
    assert row(deeper, "fsdp+ep 2").all_to_all_bytes == 2 * a2
    accum = plan(load_config(QUICKSTART, ["train.grad_accum=3"]), hw(8))
    assert row(accum, "fsdp+ep 2").all_to_all_bytes == 3 * a2
    assert row(base, "fsdp+ep 2", "full").all_to_all_bytes == a2 * 6 // 4  # the recompute's forward again


def test_checkpointing_orders_activations():
    for cfg in (load_config(QUICKSTART),
                from_dict(apply_overrides({"model": {"preset": "DiT-MoE-XL/2-8E2A"}}, ["train.batch_size=32"]))):
        result = plan(cfg, hw(8))
        for layout in {r.layout for r in result.rows}:
            full, moe_only, none = (row(result, layout, m).activation_bytes for m in ("full", "moe_only", "none"))
            assert 0 < full < moe_only < none
    # activations are per micro-batch: linear in batch size apart from the constant-size parts
    small, large = (row(plan(load_config(QUICKSTART, [f"train.batch_size={b}"]), hw(1)), "ddp").activation_bytes
                    for b in (32, 64))
    assert large == 2 * small


def test_collectives_fsdp_and_ddp():
    cfg = load_config(QUICKSTART)
    result = plan(cfg, hw(4))
    total = result.model["total_params"]
    assert row(result, "ddp").collective_bytes == round(2 * 3 / 4 * 4 * total)
    fsdp = row(result, "fsdp")
    assert fsdp.collective_bytes == 3 * fsdp.params_per_rank * (2 + 2 + 4)  # (g−1)·W·(2a + f)
    one = plan(cfg, hw(1))
    assert row(one, "fsdp").collective_bytes == row(one, "ddp").collective_bytes == 0
    assert row(one, "fsdp").comm_ms == 0.0


def test_bandwidth_rule_by_node():
    two_nodes = hw(16, gpus_per_node=8)
    assert planner.group_bandwidths(Layout("fsdp", 2), two_nodes) == {"dense": 50.0, "all_to_all": 400.0,
                                                                       "experts": 50.0}
    assert planner.group_bandwidths(Layout("fsdp", 16), two_nodes)["all_to_all"] == 50.0
    assert planner.group_bandwidths(Layout("fsdp", 4), hw(8)) == {"dense": 400.0, "all_to_all": 400.0,
                                                                  "experts": 400.0}


def test_compute_bound_is_six_activated_params_per_token():
    cfg = load_config(QUICKSTART, ["train.grad_accum=2"])
    result = plan(cfg, hw(2, peak_tflops=100.0))
    A, tokens = result.model["activated_params"], 64 * 49 * 2
    assert row(result, "ddp").compute_ms == pytest.approx(1e3 * 6 * A * tokens / 100e12)
    assert row(result, "ddp", "full").compute_ms == pytest.approx(1e3 * 8 * A * tokens / 100e12)
    none, moe_only, full = (row(result, "ddp", m).compute_ms for m in ("none", "moe_only", "full"))
    assert none < moe_only < full


def test_fits_compares_the_total_with_the_memory():
    cfg = load_config(QUICKSTART)
    r = row(plan(cfg, hw(1)), "ddp")
    assert r.total_bytes == r.state_bytes + r.working_set_bytes + r.activation_bytes
    assert r.fits
    tight = row(plan(cfg, Hardware(gpus=1, gpu_memory=r.total_bytes - 1)), "ddp")
    assert not tight.fits


# ----------------------------------------------------------------------------- inputs and CLI


def test_parse_memory():
    assert parse_memory("80GiB") == 80 * 2 ** 30
    assert parse_memory("141GB") == 141 * 10 ** 9
    assert parse_memory("24 gib") == 24 * 2 ** 30
    assert parse_memory("1.5TiB") == int(1.5 * 2 ** 40)
    for bad in ("abc", "80", "80XB", "-3GiB", "0GB", ""):
        with pytest.raises(ConfigError, match="gpu-memory"):
            parse_memory(bad)


def test_ep_must_divide_the_gpus():
    cfg = load_config(QUICKSTART, ["parallel.data=fsdp", "parallel.ep=3"])
    with pytest.raises(ConfigError, match="does not divide --gpus 4"):
        plan(cfg, hw(4))
    with pytest.raises(ConfigError, match="at least 1 GPU"):
        hw(0)


def test_cli_prints_a_table(capsys):
    assert cli_main(["plan", "-c", QUICKSTART, "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    for column in ("layout", "state MiB", "act MiB", "fits", "a2a MB", "comm ms", "compute ms"):  # a small model
        assert column in out
    lines = out.splitlines()
    assert sum(line.startswith(("ddp", "fsdp")) for line in lines) == 4 * 3  # ddp, fsdp, ep 2, ep 4 × 3 modes
    assert any(line.startswith("ddp *") and " none " in line for line in lines)
    assert any(line.startswith("fsdp+ep 4") for line in lines)


@pytest.mark.parametrize("argv,fragment", [
    (["--gpus", "0"], "--gpus 0"),
    (["--gpus", "4", "--gpu-memory", "abc"], "--gpu-memory 'abc'"),
    (["--gpus", "4", "--set", "parallel.data=fsdp", "parallel.ep=3"], "parallel.ep=3"),
])
def test_cli_bad_input_is_one_line(argv, fragment, capsys):
    assert cli_main(["plan", "-c", QUICKSTART, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moedit plan: error: ") and fragment in err[0]


def test_cli_json_and_preset(capsys):
    assert cli_main(["plan", "--preset", "DiT-MoE-S/2-8E2A", "--gpus", "8", "--set", "train.batch_size=16",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == "DiT-MoE-S/2-8E2A" and data["batch_size"] == 16
    assert data["tokens_per_micro_batch"] == 16 * 256
    layouts = [r["layout"] for r in data["rows"]]
    assert layouts[0] == "ddp" and "fsdp+ep 8" in layouts and len(layouts) == 5 * 3
    assert all(math.isfinite(r["comm_ms"]) and r["params_per_rank"] > 0 for r in data["rows"])
