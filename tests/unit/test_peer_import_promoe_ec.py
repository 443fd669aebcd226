"""ProMoE's expert-choice model: the `promoe_ec` router and `moedit import --layout promoe_ec`. Its checkpoint
has ProMoE-TC's names and shapes (models_ProMoE_EC.py); what differs is the routing, checked here against
references written from the equations (docs/ROUTING_MATH.md §4.5): in every conditional sample each
prototype's expert takes its ⌊top_k·L/E⌋ best tokens by w = G(cos(x, C_e)), G along the sample's tokens;
null-label samples go to the unconditional expert; the routing contrastive loss is taken per sample."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moedit.cli.main import main as cli_main
from moedit.config import RouterConfig
from moedit.moe.routers.promoe_ec import ProMoEExpertChoiceRouter
from moedit.moe.routing import RoutingContext
from moedit.runs import open_run

from dit_reference import dit_reference_forward  # tests/
from test_peer_import_promoe import C, E, GRID, HEADS, NULL, P, promoe_state_dict  # tests/unit/

pytestmark = pytest.mark.usefixtures("one_thread")
G = {"identity": lambda s: s, "softmax": lambda s: torch.softmax(s, dim=-1), "sigmoid": torch.sigmoid}


def promoe_ec_ffn(sd, y, top_k: int, score: str):
    """Block i's FFN by the equations, sample by sample and expert by expert. f(x) = W_down·GELU_tanh(W_up·x +
    b_up) + b_down for every expert and for the dense blocks."""

    def expert(x, prefix):
        hidden = F.gelu(F.linear(x, sd[f"{prefix}.up_proj.weight"], sd[f"{prefix}.up_proj.bias"]), approximate="tanh")
        return F.linear(hidden, sd[f"{prefix}.down_proj.weight"], sd[f"{prefix}.down_proj.bias"])

    def ffn(i, h_BLD):
        p = f"blocks.{i}.mlp"
        if f"{p}.cluster_centers" not in sd:
            hidden = F.gelu(F.linear(h_BLD, sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"]), approximate="tanh")
            return F.linear(hidden, sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"])
        centers, L = sd[f"{p}.cluster_centers"], h_BLD.shape[1]
        per_expert = max(1, min(L, int(top_k * L / E)))
        out = torch.zeros_like(h_BLD)
        for b in range(h_BLD.shape[0]):
            x_LD = h_BLD[b]
            if int(y[b]) == NULL:
                out[b] = expert(x_LD, f"{p}.experts.{E}")
            else:
                for e in range(E):
                    w_L = G[score](F.cosine_similarity(x_LD, centers[e][None], dim=-1))  # over the tokens
                    for n in w_L.topk(per_expert).indices.tolist():
                        out[b, n] += w_L[n] * expert(x_LD[n], f"{p}.experts.{e}")
            out[b] += expert(x_LD, f"{p}.shared_expert")
        return out

    return ffn


@pytest.mark.parametrize("score", ["identity", "softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_an_imported_promoe_ec_computes_its_output(tmp_path, capsys, score, top_k):
    sd = promoe_state_dict()
    torch.save(sd, tmp_path / "promoe_ec.pt")
    out = tmp_path / "run"
    assert cli_main(["import", str(tmp_path / "promoe_ec.pt"), "--out", str(out), "--layout", "promoe_ec",
                     "--heads", str(HEADS), "--top-k", str(top_k), "--score", score]) == 0, capsys.readouterr().err
    run = open_run(out)
    r = run.cfg.model.moe.router
    assert (r.name, r.score, r.top_k) == ("promoe_ec", score, top_k)
    assert json.loads((out / "conversion.json").read_text())["layout"] == "promoe_ec"
    model = run.load_model("ema").eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, C, GRID * P, GRID * P, generator=gen)
    y, sigma = torch.tensor([0, 3, NULL, 999]), torch.tensor([0.0, 0.37, 1.0, 0.65])
    with torch.no_grad():
        want = dit_reference_forward(sd, x, 1000 * sigma, y, HEADS, P, ffn=promoe_ec_ffn(sd, y, top_k, score))
        got = model(x, sigma, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the token-choice reading of the same weights computes something else: the layout matters
    assert cli_main(["import", str(tmp_path / "promoe_ec.pt"), "--out", str(tmp_path / "tc"), "--heads", str(HEADS),
                     "--top-k", str(top_k), "--score", score]) == 0
    with torch.no_grad():
        assert (open_run(tmp_path / "tc").load_model("ema").eval()(x, sigma, y) - want).abs().max() > 1e-3


def test_auto_imports_a_promoe_checkpoint_as_token_choice_and_says_how_to_choose_expert_choice(tmp_path, capsys):
    torch.save(promoe_state_dict(), tmp_path / "p.pt")
    assert cli_main(["import", str(tmp_path / "p.pt"), "--out", str(tmp_path / "a"), "--heads", str(HEADS)]) == 0
    assert "pass --layout promoe_ec" in capsys.readouterr().out
    assert open_run(tmp_path / "a").cfg.model.moe.router.name == "promoe"
    from test_peer_import import dit_moe_state_dict  # tests/unit/

    torch.save(dit_moe_state_dict(), tmp_path / "d.pt")
    assert cli_main(["import", str(tmp_path / "d.pt"), "--out", str(tmp_path / "b"), "--layout", "promoe_ec",
                     "--heads", str(HEADS)]) == 2
    assert "is not a promoe_ec checkpoint (its keys look like dit_moe)" in capsys.readouterr().err


def _reference_contrastive(prototypes_ED, x_BLD, y_B, top_k: int, tau: float) -> torch.Tensor:
    """Per conditional sample b: m_{b,e} = mean of the tokens expert e took; cross-entropy of
    cos(C_e, m_{b,f})/τ over f against f = e, averaged over samples and experts."""
    L, terms = x_BLD.shape[1], []
    per_expert = max(1, min(L, int(top_k * L / E)))
    for b in range(x_BLD.shape[0]):
        if int(y_B[b]) == NULL:
            continue
        cos_EL = F.cosine_similarity(x_BLD[b][None], prototypes_ED[:, None], dim=-1)
        means = torch.stack([x_BLD[b][cos_EL[e].topk(per_expert).indices].mean(0) for e in range(E)])
        for e in range(E):
            logits = torch.stack([F.cosine_similarity(prototypes_ED[e], means[f], dim=0) for f in range(E)]) / tau
            terms.append(-torch.log_softmax(logits, 0)[e])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_contrastive_loss_is_taken_per_sample_and_reaches_prototypes_and_tokens(top_k):
    torch.manual_seed(0)
    B, L, D = 3, 8, 16
    router = ProMoEExpertChoiceRouter(D, E, RouterConfig(name="promoe_ec", top_k=top_k, score="identity",
                                                         prototype_std=0.5))
    x_BLD = torch.randn(B, L, D, requires_grad=True)
    y_B = torch.tensor([2, NULL, 7])
    ctx = RoutingContext(batch=B, seq_len=L, labels_B=y_B, null_label=NULL)
    routing = router(x_BLD.reshape(B * L, D), ctx)
    want = _reference_contrastive(router.prototypes_ED, x_BLD, y_B, top_k, router.cfg.contrastive_tau)
    torch.testing.assert_close(routing.aux["contrastive"], want)
    routing.aux["contrastive"].backward()
    assert router.prototypes_ED.grad.abs().min() > 0 and x_BLD.grad[0].abs().sum() > 0
    assert x_BLD.grad[1].abs().sum() == 0  # the null-label sample is not in the loss
    per_expert = max(1, int(top_k * L / E))
    counts = torch.bincount(routing.expert_M, minlength=E + 1)
    assert counts.tolist() == [2 * per_expert] * E + [L]  # every expert: its share of each conditional sample


def test_no_conditional_sample_gives_a_zero_loss_and_only_the_unconditional_expert():
    router = ProMoEExpertChoiceRouter(16, E, RouterConfig(name="promoe_ec", top_k=1, score="identity"))
    ctx = RoutingContext(batch=2, seq_len=4, labels_B=torch.tensor([NULL, NULL]), null_label=NULL)
    routing = router(torch.randn(8, 16), ctx)
    assert routing.aux["contrastive"].item() == 0.0
    assert routing.expert_M.tolist() == [E] * 8 and routing.weight_M.tolist() == [1.0] * 8
