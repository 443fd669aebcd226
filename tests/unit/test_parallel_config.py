"""The `parallel` config section: bad combinations answered with the key and the fix, the expert split
rule, and `moedit train --dry-run`'s layout text (docs/SCALING.md)."""

from __future__ import annotations

import pytest

from moedit.cli.main import main
from moedit.config import ConfigError, load_config
from moedit.distributed.describe import describe_layout
from moedit.distributed.mesh import check_ep, expert_ranges
from moedit.distributed.parallelize import shard_dim

QUICKSTART = "configs/quickstart.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["parallel.data=zero3"], "parallel.data"),
    (["parallel.ep=2"], "needs sharded data parallelism: set parallel.data=fsdp"),
    (["parallel.ep=0", "parallel.data=fsdp"], "parallel.ep"),
    (["parallel.activation_checkpointing=some"], "parallel.activation_checkpointing"),
    (["parallel.data=fsdp", "model.moe.expert_layout=col"], "expert_layout=row"),
    (["parallel.data=fsdp", "train.param_dtype=bf16", "train.precision=bf16"], "train.param_dtype=fp32"),
    (["parallel.data=fsdp", "train.bf16_monitor_every=5"], "train.bf16_monitor_every=0"),
    (["parallel.timeout_s=0"], "parallel.timeout_s"),
])
def test_bad_parallel_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(QUICKSTART, overrides)


def test_dense_model_has_no_experts_to_split():
    with pytest.raises(ConfigError, match="no MoE layer"):
        load_config("configs/dense_quickstart.yaml", ["parallel.data=fsdp", "parallel.ep=2"])


def test_expert_split_follows_torch_chunk():
    assert expert_ranges(8, 2) == [(0, 4), (4, 8)]
    assert expert_ranges(9, 2) == [(0, 5), (5, 9)]  # ProMoE's 8 + 1 unconditional expert
    check_ep(2, 4, [8, 9])
    with pytest.raises(ConfigError, match="does not divide the 4 ranks"):
        check_ep(3, 4, [8])
    with pytest.raises(ConfigError, match="without an expert"):
        check_ep(4, 4, [5])  # 2/2/1/0


def test_shard_dim_avoids_whole_rows_on_few_ranks():
    assert shard_dim((1152, 4608), 8) == 0
    assert shard_dim((1, 384, 768), 8) == 2  # one shared expert: along its largest dimension
    assert shard_dim((2, 64, 64), 4) == 1  # two local experts over four ranks: tie → the first


def test_dry_run_prints_the_layout(capsys):
    assert main(["train", "-c", QUICKSTART, "--dry-run", "--world", "4",
                 "--set", "parallel.data=fsdp", "parallel.ep=2", "parallel.activation_checkpointing=moe_only"]) == 0
    out = capsys.readouterr().out
    assert "expert mesh efsdp[2] x ep[2]: ep groups {0,1} {2,3}; efsdp groups {0,2} {1,3}" in out
    assert "8 experts split over ep (ep0: 0-3, ep1: 4-7)" in out
    assert "every MoE feed-forward keeps only its input" in out
    one = describe_layout(load_config(QUICKSTART, ["parallel.data=fsdp"]), 1)
    assert "apply from 2 ranks on" in one
