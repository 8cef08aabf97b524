"""model.recompute=auto: the decision from measured block memory, and its configuration checks."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from distributed import run_on_ranks

from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.model.recompute_budget import (
    BlockMemory,
    blocks_to_recompute,
    describe,
    largest_over_ranks,
    predicted_peak,
)

GIB = 2**30
# MfM-2B at 22k tokens, one H200 (141 GiB): about 2.4 GiB kept per block, 79 MiB per block input
BLOCK = BlockMemory(kept=int(2.4 * GIB), input=22_000 * 1792 * 2)


@pytest.mark.parametrize("peak_gib,budget_gib", [(20, 129), (40, 129), (60, 129), (20, 60), (20, 400)])
def test_fewest_recomputed_blocks_that_fit(peak_gib, budget_gib):
    """The choice fits the budget and one block fewer would not (or none are recomputed)."""
    chosen = blocks_to_recompute(28, BLOCK, peak_gib * GIB, budget_gib * GIB)
    assert predicted_peak(28, chosen, BLOCK, peak_gib * GIB) <= budget_gib * GIB
    assert chosen == 0 or predicted_peak(28, chosen - 1, BLOCK, peak_gib * GIB) > budget_gib * GIB


def test_more_memory_recomputes_fewer_blocks():
    choices = [blocks_to_recompute(28, BLOCK, 20 * GIB, budget * GIB) for budget in (40, 60, 80, 100, 120, 140)]
    assert choices == sorted(choices, reverse=True) and choices[0] > choices[-1] == 0


def test_nothing_fits_recomputes_everything():
    assert blocks_to_recompute(28, BLOCK, 100 * GIB, 50 * GIB) == 28


def test_prediction_extrapolates_from_the_measured_step():
    """At the measured configuration (all blocks but the first recomputed) the prediction is the
    measurement; each block kept instead adds what it keeps less its input."""
    block = BlockMemory(kept=100, input=10)
    assert predicted_peak(4, 3, block, measured_peak=1000) == 1000
    assert predicted_peak(4, 0, block, measured_peak=1000) == 1000 + 3 * 90
    assert predicted_peak(4, 4, block, measured_peak=1000) == 1000 - 90


def _largest_on(rank_values: list[tuple[int, int]]) -> list[int]:
    dist.init_process_group("gloo")
    return largest_over_ranks(*rank_values[dist.get_rank()])


def test_every_rank_decides_from_the_largest_measurement():
    """Ranks that measured different memory take the same (largest) figures, so they recompute
    the same blocks and their backward collectives line up."""
    per_rank = [(7 * GIB, 3 * GIB), (5 * GIB, 4 * GIB)]
    results = run_on_ranks(2, _largest_on, per_rank)
    assert results == [[7 * GIB, 4 * GIB]] * 2
    assert largest_over_ranks(1, 2) == [1, 2]  # one process: the values themselves


@pytest.mark.parametrize("overrides,message", [
    (["model.recompute=maybe"], "model.recompute='maybe': choose true, false or auto"),
    (["model.recompute=auto", "model.recompute_num_layers=4"], "model.recompute_num_layers=4: needs model.recompute=true"),
    (["model.attention_backend=flash"], "model.attention_backend='flash'"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=overrides)


def test_auto_needs_one_pipeline_stage():
    config = load_config(overrides=["model.recompute=auto", "parallel.pipeline_parallel=2",
                                    "train.global_batch_size=2"])
    with pytest.raises(ConfigError, match="model.recompute=auto needs parallel.pipeline_parallel=1"):
        config.check_world(2)


def test_the_decision_reads_as_one_log_line():
    decision = dict(recomputed_blocks=12, blocks=40, kept_bytes=5 * GIB, input_bytes=GIB // 4,
                    measured_peak_bytes=100 * GIB, budget_bytes=129 * GIB, predicted_peak_bytes=128 * GIB)
    assert describe(decision) == (
        "recompute=auto: 12 of 40 blocks recomputed, predicted peak 128.0 GiB of a 129.0 GiB budget (a block "
        "keeps 5.00 GiB, its input 0.25; measured peak with 39 recomputed 100.0 GiB)")
