"""model.recompute=auto: the decision from measured block memory, and its configuration checks."""

from __future__ import annotations

import pytest

from megatron_mfm.config import ConfigError, load_config
from megatron_mfm.model.recompute_budget import BlockMemory, blocks_to_recompute, predicted_peak

GIB = 2**30
# MfM-2B at 22k tokens, one H200 (141 GiB): about 2.4 GiB kept per block, 79 MiB per block input
BLOCK = BlockMemory(kept=int(2.4 * GIB), input=22_000 * 1792 * 2)


@pytest.mark.parametrize("base_gib,budget_gib", [(20, 129), (40, 129), (60, 129), (20, 60), (20, 400)])
def test_fewest_recomputed_blocks_that_fit(base_gib, budget_gib):
    """The choice fits the budget and one block fewer would not (or none are recomputed)."""
    chosen = blocks_to_recompute(28, BLOCK, base_gib * GIB, budget_gib * GIB)
    assert predicted_peak(28, chosen, BLOCK, base_gib * GIB) <= budget_gib * GIB
    assert chosen == 0 or predicted_peak(28, chosen - 1, BLOCK, base_gib * GIB) > budget_gib * GIB


def test_more_memory_recomputes_fewer_blocks():
    choices = [blocks_to_recompute(28, BLOCK, 20 * GIB, budget * GIB) for budget in (40, 60, 80, 100, 120, 140)]
    assert choices == sorted(choices, reverse=True) and choices[0] > choices[-1] == 0


def test_nothing_fits_recomputes_everything():
    assert blocks_to_recompute(28, BLOCK, 100 * GIB, 50 * GIB) == 28


def test_predicted_peak_counts_kept_blocks_inputs_and_one_transient():
    assert predicted_peak(4, 1, BlockMemory(kept=100, input=10), base=1000) == 1000 + 3 * 100 + 10 + 100


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
