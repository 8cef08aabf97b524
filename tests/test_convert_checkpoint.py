"""tools/convert_checkpoint.py end to end: official -> dist checkpoint -> official, and forward."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_mfm.export.official_io import INDEX_NAME, WEIGHTS_NAME, OfficialWeights
from tools import convert_checkpoint
from mfm_cases import TINY, make_inputs, make_reference

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "convert_checkpoint.py")

OFFICIAL_CONFIG = {
    "_class_name": "Transformer3DModel",
    "num_attention_heads": TINY["heads"],
    "attention_head_dim": TINY["head_dim"],
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": TINY["layers"],
    "cross_attention_dim": TINY["text_dim"],
    "attention_bias": TINY["bias"],
    "sample_size": 64,
    "patch_size": 2,
    "patch_size_t": 1,
    "activation_fn": "gelu-approximate",
    "norm_type": "ada_norm_zero",
    "adaln_norm_type": "legacy",
    "use_rope": True,
    "add_motion_score": True,
    "condition_type": "inpaint_mask",
    "use_depth_cond": True,
    "num_block_chunks": 1,
}


def run_tool(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, TOOL] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
        "--master-port", str(_port()), TOOL,
    ]
    return subprocess.run(launcher + list(args), capture_output=True, text=True, timeout=600)


def _port() -> int:
    from conftest import free_port

    return free_port()


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], torch.nn.Module]:
    """An official-layout folder with weights split over two safetensors shards + index."""
    folder = tmp_path_factory.mktemp("official")
    reference = make_reference(seed=3)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, folder / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    return folder, state, reference


@pytest.fixture(scope="module")
def checkpoint(official, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("ckpt") / "tp1"
    check(run_tool("import-official", "--official", str(official[0]), "--save", str(ckpt)))
    return ckpt


def assert_bitwise_equal(folder: Path, state: dict[str, torch.Tensor]) -> None:
    with OfficialWeights(folder) as exported:
        assert exported.keys() == sorted(state)
        for key, tensor in state.items():
            assert exported.get(key).dtype == tensor.dtype and torch.equal(exported.get(key), tensor), key
    config = json.loads((folder / "config.json").read_text())
    for key in ("num_attention_heads", "attention_head_dim", "num_layers", "cross_attention_dim",
                "attention_bias", "use_depth_cond", "add_motion_score", "in_channels"):
        assert config[key] == OFFICIAL_CONFIG[key], key


def test_import_then_export_is_bitwise(official, checkpoint, tmp_path):
    check(run_tool("export-official", "--load", str(checkpoint), "--output", str(tmp_path / "out")))
    assert_bitwise_equal(tmp_path / "out", official[1])
    assert not list(tmp_path.glob(".*tmp*")), "temporary directory left behind"


def test_sharded_export_round_trips_and_loads_in_diffusers(official, checkpoint, tmp_path):
    """A tiny --max-shard-size splits the export into shards + index holding the bytes that were
    imported (from the sharded fixture), and diffusers' from_pretrained reads them."""
    sharded = tmp_path / "sharded"
    check(run_tool("export-official", "--load", str(checkpoint), "--output", str(sharded), "--max-shard-size", "64KB"))
    index = json.loads((sharded / INDEX_NAME).read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert not (sharded / WEIGHTS_NAME).exists() and len(shards) > 2
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in official[1].values())
    for shard in shards:  # under the cap, or one tensor larger than the cap alone
        names = [k for k, v in index["weight_map"].items() if v == shard]
        assert len(names) == 1 or sum(official[1][k].numel() * 4 for k in names) <= 64_000, shard
    assert_bitwise_equal(sharded, official[1])

    loaded = diffusers_reference(sharded)
    for key, tensor in official[1].items():
        assert torch.equal(loaded[key], tensor), key


def diffusers_reference(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict diffusers' ``ModelMixin.from_pretrained`` loads from an exported folder
    into a module with the official parameter names."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    from benchmarks.plain_mfm import ReferenceMfM

    class Transformer3DModel(ModelMixin, ConfigMixin):
        config_name = "config.json"

        @register_to_config
        def __init__(self, num_layers: int = 1, num_attention_heads: int = 1, attention_head_dim: int = 1,
                     cross_attention_dim: int = 1, attention_bias: bool = False):
            super().__init__()
            reference = ReferenceMfM(num_layers, num_attention_heads, attention_head_dim, cross_attention_dim,
                                     bias=attention_bias)
            for name, child in reference.named_children():
                self.add_module(name, child)

    model = Transformer3DModel.from_pretrained(str(folder), low_cpu_mem_usage=False)
    return model.state_dict()


def test_bad_shard_size_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        convert_checkpoint.parse_args(["export-official", "--load", "c", "--output", "o", "--max-shard-size", "lots"])
    assert "--max-shard-size" in capsys.readouterr().err


def test_import_at_tp2_then_export_is_bitwise(official, tmp_path):
    ckpt = tmp_path / "tp2"
    check(run_tool("import-official", "--official", str(official[0]), "--save", str(ckpt), "--tp", "2", ranks=2))
    check(run_tool("export-official", "--load", str(ckpt), "--output", str(tmp_path / "out")))
    assert_bitwise_equal(tmp_path / "out", official[1])


@pytest.fixture(scope="module")
def forward_case(official, tmp_path_factory):
    """Inputs named as the official forward's arguments, and the reference output."""
    inputs = make_inputs(frames=3)
    official_inputs = {
        "hidden_states": inputs["latents"],
        "conditional_pixel_values": inputs["condition"][:, :4].contiguous(),
        "conditional_masks": inputs["condition"][:, 4:].contiguous(),
        "encoder_hidden_states": inputs["text"],
        "encoder_attention_mask": inputs["text_mask"],
        "timestep": inputs["timestep"],
        "motion_score": inputs["motion_score"],
    }
    path = tmp_path_factory.mktemp("io") / "inputs.safetensors"
    save_file(official_inputs, path)
    with torch.no_grad():
        expected = official[2](**inputs)
    return path, expected


@pytest.mark.parametrize("layout", [[], ["--tp", "2"], ["--tp", "2", "--sequence-parallel"]],
                         ids=["tp1", "tp2", "tp2-sp"])
def test_forward_matches_reference(checkpoint, forward_case, tmp_path, layout):
    inputs, expected = forward_case
    out = tmp_path / "out.safetensors"
    ranks = 2 if layout else 1
    check(run_tool("forward", "--load", str(checkpoint), "--inputs", str(inputs), "--output", str(out),
                   *layout, ranks=ranks))
    sample = load_file(out)["sample"]
    assert ((sample - expected).norm() / expected.norm()).item() < 1e-5


def test_mismatched_checkpoint_names_keys_and_shapes(checkpoint, forward_case, tmp_path):
    wrong = tmp_path / "wrong"
    subprocess.run(["cp", "-r", str(checkpoint), str(wrong)], check=True)
    config = json.loads((wrong / "mfm_config.json").read_text())
    config["text_hidden_size"] = 32
    (wrong / "mfm_config.json").write_text(json.dumps(config))
    result = run_tool("forward", "--load", str(wrong), "--inputs", str(forward_case[0]),
                      "--output", str(tmp_path / "o.safetensors"))
    assert result.returncode != 0
    assert "cross_attention.linear_kv.weight: checkpoint (256, 48) vs model (256, 32)" in result.stderr


def test_incomplete_checkpoint_is_refused(checkpoint, tmp_path):
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(checkpoint), str(partial)], check=True)
    (partial / "metadata.json").unlink()
    result = run_tool("export-official", "--load", str(partial), "--output", str(tmp_path / "out"))
    assert result.returncode != 0 and "not a complete dist checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_overwritten(checkpoint, official):
    result = run_tool("import-official", "--official", str(official[0]), "--save", str(checkpoint))
    assert result.returncode != 0 and "already exists" in result.stderr


def test_every_subcommand_has_help(capsys):
    tool = convert_checkpoint
    for command in ("import-official", "export-official", "reshard", "forward"):
        with pytest.raises(SystemExit) as exit_:
            tool.parse_args([command, "--help"])
        assert exit_.value.code == 0 and "--" in capsys.readouterr().out


def test_inspect_summarises_and_diffs(official, checkpoint, tmp_path):
    inspect = [sys.executable, str(ROOT / "tools" / "inspect_checkpoint.py")]
    result = subprocess.run(inspect + [str(checkpoint)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    total = sum(v.numel() for v in official[1].values())
    assert f'"parameters": {total}' in result.stdout
    assert "layers.1.self_attention.linear_qkv.weight" in result.stdout

    other = tmp_path / "other"
    check(run_tool("import-official", "--official", str(official[0]), "--save", str(other), "--tp", "2", ranks=2))
    same = subprocess.run(inspect + [str(checkpoint), "--diff", str(other)], capture_output=True, text=True)
    assert same.returncode == 0 and "0 of" in same.stdout, same.stdout[-2000:]


def test_reshard_to_pp2_keeps_every_tensor(official, checkpoint, tmp_path):
    resharded = tmp_path / "pp2"
    check(run_tool("reshard", "--load", str(checkpoint), "--save", str(resharded), "--pp", "2", ranks=2))
    check(run_tool("export-official", "--load", str(resharded), "--output", str(tmp_path / "out")))
    assert_bitwise_equal(tmp_path / "out", official[1])


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_export_complete_pipeline_folder(official, checkpoint, tmp_path, link):
    source = tmp_path / "MfM"
    for name, payload in {"vae/config.json": "{}", "text_encoder/config.json": "{}", "tokenizer/spiece.model": "x",
                          "scheduler/scheduler_config.json": "{}", "transformer/config.json": "{}",
                          "model_index.json": '{"_class_name": "MfMPipeline"}'}.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(payload)
    out = tmp_path / "export"
    check(run_tool("export-official", "--load", str(checkpoint), "--output", str(out), "--pipeline", str(source),
                   *(["--link"] if link else [])))
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "transformer", "vae"]
    assert (out / "vae").is_symlink() == link and (out / "tokenizer" / "spiece.model").read_text() == "x"
    assert_bitwise_equal(out / "transformer", official[1])


def test_import_refuses_weights_the_config_does_not_describe(official, tmp_path, single_process_world):
    from megatron_mfm.checkpoint.layout import CheckpointError
    from megatron_mfm.checkpoint.model_state import build_from_official

    folder = tmp_path / "fewer"
    shutil.copytree(official[0], folder)
    (folder / "config.json").write_text(json.dumps({**OFFICIAL_CONFIG, "num_layers": TINY["layers"] - 1}))
    with pytest.raises(CheckpointError, match=r"fewer: \d+ of \d+ tensors are not part of the model .*transformer_blocks"):
        build_from_official(folder)


def test_forward_never_overwrites_its_output(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"kept")
    args = convert_checkpoint.parse_args(["forward", "--load", str(tmp_path), "--inputs", str(out), "--output", str(out)])
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_checkpoint.forward(args)
    assert out.read_bytes() == b"kept"


def hugging_face_snapshot(root: Path, files: dict[str, str]) -> Path:
    """A Hugging Face cache entry: each file of the snapshot a relative link to its blob."""
    snapshot = root / "snapshots" / "0123abc"
    for number, (name, payload) in enumerate(files.items()):
        blob = root / "blobs" / f"blob{number}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_text(payload)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_pipeline_export_from_a_hugging_face_cache_copies_the_linked_files(tmp_path):
    from megatron_mfm.export.official_io import write_pipeline

    files = {"model_index.json": '{"_class_name": "MfMPipeline"}', "vae/config.json": '{"vae": 1}',
             "tokenizer/spiece.model": "sp", "transformer/config.json": "{}"}
    snapshot = hugging_face_snapshot(tmp_path / "models--org--MfM", files)
    assert (snapshot / "vae" / "config.json").is_symlink()
    out = write_pipeline(tmp_path / "export", snapshot, OFFICIAL_CONFIG, {"w": torch.ones(2)})
    for name, payload in files.items():
        if not name.startswith("transformer/"):
            assert not (out / name).is_symlink() and (out / name).read_text() == payload, name

    (tmp_path / "models--org--MfM" / "blobs" / "blob1").unlink()  # an interrupted download
    with pytest.raises(FileNotFoundError, match=r"vae/config.json: a symbolic link to \.\./\.\./\.\./blobs/blob1"):
        write_pipeline(tmp_path / "export2", snapshot, OFFICIAL_CONFIG, {"w": torch.ones(2)})
    assert not (tmp_path / "export2").exists()
