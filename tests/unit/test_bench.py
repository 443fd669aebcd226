"""The benchmarks' implementations compute the same layer (forward and gradients, awkward routings
included), and `moedit bench` writes its tables; no test looks at a time."""

from __future__ import annotations

import json

import pytest
import torch

from moedit.bench.layer import LayerCase, implementation, make_routing, run_case, runnable
from moedit.bench.model import variants
from moedit.bench.report import layer_markdown, model_markdown
from moedit.cli.main import main as cli_main
from moedit.moe import glue_triton
from moedit.moe.experts import StackedExperts
from moedit.moe.routing import Routing

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _grads(name, experts, x, routing, k):
    experts.zero_grad()
    x = x.detach().requires_grad_(True)
    w = routing.weight_M.detach().requires_grad_(True)
    r = Routing(routing.token_M, routing.expert_M, w, routing.num_tokens, routing.num_experts, per_token=routing.per_token)
    y = implementation(name, experts, (), k)(x, r)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, w.grad, experts.w1_EDH.grad.clone(), experts.b2_ED.grad.clone()


@pytest.mark.parametrize("tokens, skewed", [(1, False), (40, False), (40, True)])
def test_peer_loops_match_moedit_forward_and_gradients(tokens, skewed):
    gen = torch.Generator().manual_seed(3)
    E, k = 6, 2
    experts = StackedExperts(E, 8, 12)
    routing = make_routing(tokens, E, k, skewed, gen, torch.device("cpu"))
    x = torch.randn(tokens, 8, generator=gen)
    want = _grads("moedit_loop", experts, x, routing, k)
    assert routing.load_E().min() == 0 or tokens > 1  # a batch of one leaves experts empty
    names, _ = runnable(("index_loop", "mask_loop", "moedit_grouped", "moedit_grouped_scatter", "moedit_fused",
                         "moedit_fused_scatter", "moedit_grouped_col", "moedit_fused_col"), torch.device("cpu"))
    for name in (n for n in names if not n.endswith("_col")):
        for got, ref in zip(_grads(name, experts, x, routing, k), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)
    for name in (n for n in names if n.endswith("_col")):  # a column-major copy: its own parameters
        y = implementation(name, experts, (), k)(x, routing)
        torch.testing.assert_close(y, want[0], rtol=1e-5, atol=1e-5, msg=name)


def test_fused_implementations_are_left_out_where_they_cannot_run(monkeypatch):
    names = ("dense", "moedit_grouped", "moedit_fused", "moedit_fused_col")
    if glue_triton.TRITON_FOUND:  # Triton's interpreter runs them on CPU tensors
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert runnable(names, torch.device("cpu")) == (names, None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kept, reason = runnable(names, torch.device("cpu"))
    assert kept == ("dense", "moedit_grouped") and "fused MoE backend" in reason
    with pytest.raises(SystemExit, match="moedit_fused cannot run here: the fused MoE backend"):
        cli_main(["bench", "layer", "--device", "cpu", "--impl", "moedit_fused"])
    assert not any("fused" in v.name for v in variants())
    assert [v.name for v in variants(fused=True) if "fused" in v.name] == ["topk E8 top-2 (fused)", "race E8 top-2 (fused)"]


def test_run_case_rows_and_tables():
    case = LayerCase("tiny", experts=4, hidden=16, top_k=2, tokens=32, width=8)
    rows = run_case(case, skewed=True, device=torch.device("cpu"), dtype=torch.float32,
                    names=("dense", "index_loop", "moedit_grouped"), repeats=1)
    assert [r["impl"] for r in rows] == ["dense", "index_loop", "moedit_grouped"]
    assert rows[0]["ratio_to_dense"] == 1.0 and all(r["tflops"] > 0 for r in rows)
    assert rows[1]["rel_error"] < 1e-5 and rows[1]["max_over_mean_load"] > 1
    meta = {"device": "cpu", "torch": "x", "python": "3", "threads": 1, "preset": "t", "repeats": 1, "dtype": "float32"}
    md = layer_markdown({"meta": meta, "rows": rows})
    assert "| tiny | skewed" in md and "| index_loop |" in md
    model_md = model_markdown({"meta": {**meta, "batch": 2}, "rows": [
        {"variant": "dense (FFN 4D)", "ms": 2.0, "img_per_s": 1000.0, "ratio_to_dense": 1.0, "peak_mib": None, "params": 1e6}]})
    assert "| dense (FFN 4D) | 2.0 | 1000.0 | 1.00 | — | 1.0M |" in model_md


def test_bench_model_cli_writes_json_and_markdown(tmp_path):
    out = tmp_path / "model_cpu"
    assert cli_main(["bench", "model", "--device", "cpu", "--repeats", "1", "--impl", "dense", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["dense (FFN 4D)"] and result["rows"][0]["img_per_s"] > 0
    assert "images/s" in out.with_suffix(".md").read_text()


def test_bench_sample_cli(tmp_path):
    out = tmp_path / "sample_cpu"
    assert cli_main(["bench", "sample", "--device", "cpu", "--repeats", "1", "--impl", "race E8 top-2 (grouped)", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["race E8 top-2 (grouped)"] and result["rows"][0]["img_per_s"] > 0
    assert "Sampling: euler 10 steps" in out.with_suffix(".md").read_text()


def test_a_failing_implementation_gets_a_row_and_the_run_goes_on(tmp_path, monkeypatch):
    import moedit.bench.layer as layer_bench

    real = layer_bench.implementation

    def broken(name, *args):
        if name == "moedit_grouped":
            raise RuntimeError("CUDA out of memory | while timing")
        return real(name, *args)

    monkeypatch.setattr(layer_bench, "implementation", broken)
    tiny = LayerCase("tiny", experts=4, hidden=16, top_k=2, tokens=32, width=8)
    monkeypatch.setattr(layer_bench, "cpu_cases", lambda: [tiny])
    out = tmp_path / "layer"
    code = cli_main(["bench", "layer", "--device", "cpu", "--impl", "dense", "moedit_grouped", "moedit_loop",
                     "--routing", "random", "--repeats", "1", "--out", str(out)])
    assert code == 1  # the run says something failed, after writing what it measured
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["dense", "moedit_grouped", "moedit_loop"]
    assert rows[1]["failed"] == "RuntimeError: CUDA out of memory | while timing" and rows[1]["ratio_to_dense"] is None
    assert rows[2]["tflops"] > 0 and "failed" not in rows[2]
    assert "| moedit_grouped | failed: RuntimeError: CUDA out of memory / while timing | — | — | — |" in \
        out.with_suffix(".md").read_text()


def test_a_wrong_implementation_is_reported_not_timed(monkeypatch):
    import moedit.bench.layer as layer_bench

    real = layer_bench.implementation
    monkeypatch.setattr(layer_bench, "implementation",
                        lambda name, *a: (lambda x, r: 2 * real(name, *a)(x, r)) if name == "moedit_loop" else real(name, *a))
    case = LayerCase("tiny", experts=4, hidden=16, top_k=2, tokens=32, width=8)
    rows = run_case(case, skewed=False, device=torch.device("cpu"), dtype=torch.float32,
                    names=("moedit_loop", "moedit_grouped"), repeats=1)
    assert rows[0]["failed"].startswith("AssertionError: disagrees with the float32 reference") and rows[0]["ms"] is None
    assert rows[1]["rel_error"] < 1e-5


def test_a_failing_model_variant_gets_a_row(tmp_path, monkeypatch):
    import moedit.bench.model as model_bench

    real = model_bench.build_trainer

    def build(variant, *args):
        if variant.moe is not None:
            raise RuntimeError("no kernel image is available")
        return real(variant, *args)

    monkeypatch.setattr(model_bench, "build_trainer", build)
    result = model_bench.run_model_bench("cpu", "cpu", repeats=1, names=["dense", "topk E8 top-2 (loop)"], log=lambda m: None)
    assert [r["variant"] for r in result["rows"]] == ["dense (FFN 4D)", "topk E8 top-2 (loop)"]
    assert result["rows"][0]["img_per_s"] > 0
    assert result["rows"][1]["failed"] == "RuntimeError: no kernel image is available"
    assert "| topk E8 top-2 (loop) | failed: RuntimeError: no kernel image is available |" in model_markdown(result)
