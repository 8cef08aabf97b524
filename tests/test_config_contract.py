"""The run configuration parses and validates without megatron, and builds the megatron config
that the training loop uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mfm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_parsing_every_example_config_imports_no_megatron():
    script = (
        "import sys\n"
        "from megatron_mfm.config import load_config\n"
        f"for path in sorted(__import__('pathlib').Path({str(ROOT / 'examples')!r}).glob('*.yaml')):\n"
        "    load_config(path)\n"
        "print(sorted(m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_to_model_config_carries_layout_precision_and_recompute():
    config = load_config(ROOT / "examples" / "tiny_cpu.yaml", [
        "parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.context_parallel=2",
        "parallel.context_parallel_comm=p2p", "train.precision=bf16", "model.recompute=true",
        "model.recompute_num_layers=1"])
    model = config.to_model_config()
    assert (model.tensor_model_parallel_size, model.context_parallel_size, model.cp_comm_type) == (2, 2, "p2p")
    assert model.sequence_parallel and model.bf16 and not model.fp8
    assert (model.recompute_granularity, model.recompute_method, model.recompute_num_layers) == ("full", "block", 1)


def test_missing_shard_index_is_a_file_check_not_a_parse_error(tmp_path):
    config = load_config(overrides=["data.source=shards", f"data.shards.path={tmp_path}"])  # parses: no I/O
    with pytest.raises(ConfigError, match="data.shards.path=.*no index.json"):
        config.check_files()


@pytest.mark.parametrize("override, message", [
    ("checkpoint.save=[a, b]", "checkpoint.save: expected text, got ['a', 'b']"),
    ("tasks.weights={t2v: high}", "tasks.weights.t2v: expected float, got 'high'"),
])
def test_wrongly_typed_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert str(error.value) == message


def test_packing_is_off_by_default_and_a_negative_budget_names_the_field():
    assert load_config().data.packing.token_budget == 0
    with pytest.raises(ConfigError, match=r"data.packing.token_budget=-1 must be >= 0"):
        load_config(overrides=["data.packing.token_budget=-1"])


def test_compile_glue_takes_tuned_and_a_bad_value_names_the_field():
    assert load_config(overrides=["model.compile_glue=tuned"]).to_model_config().compile_glue == "tuned"
    with pytest.raises(ConfigError, match="model.compile_glue='fast': choose true, false or tuned"):
        load_config(overrides=["model.compile_glue=fast"])
