"""The one map between megatron_mfm parameter names and the official MfM ``Transformer3DModel``.

Both conversion directions use the same rule table. Tensors here are GLOBAL (unsharded).

Fused layouts (and why they reshard for free): ``linear_qkv.weight`` is (heads, 3, head_dim, D)
flattened to (3*D, D): for each head its q rows, then k rows, then v rows. ``linear_kv.weight``
is (heads, 2, head_dim, C_text) the same way. Megatron's column-parallel sharding splits dim 0
into TP-many contiguous blocks, i.e. rank r owns heads [r*H/tp, (r+1)*H/tp) with all three of
their projections, matching the head-sharded QK-norm weights. The global tensor is therefore
identical at every TP size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from megatron_mfm.model.config import MfMConfig

Tensor = torch.Tensor


def _fuse_per_head(heads: int) -> Callable[[list[Tensor]], Tensor]:
    def fuse(parts: list[Tensor]) -> Tensor:
        return torch.stack([p.unflatten(0, (heads, -1)) for p in parts], dim=1).flatten(0, 2)

    return fuse


def _split_per_head(heads: int, count: int) -> Callable[[Tensor], list[Tensor]]:
    def split(fused: Tensor) -> list[Tensor]:
        grouped = fused.unflatten(0, (heads, count, -1))
        return [grouped[:, i].flatten(0, 1).contiguous() for i in range(count)]

    return split


@dataclass(frozen=True)
class Rule:
    """``ours`` <-> ``official`` names (``{i}`` = layer index, ``{p}`` = weight|bias)."""

    ours: str
    official: tuple[str, ...]
    fuse: Callable[[list[Tensor]], Tensor] | None = None
    split: Callable[[Tensor], list[Tensor]] | None = None


def _rules(config: MfMConfig) -> list[Rule]:
    heads = config.num_attention_heads
    qkv = dict(fuse=_fuse_per_head(heads), split=_split_per_head(heads, 3))
    kv = dict(fuse=_fuse_per_head(heads), split=_split_per_head(heads, 2))
    block = "transformer_blocks.{i}."
    return [
        Rule("patch_embed.proj.{p}", ("pos_embed.proj.{p}",)),
        Rule("cond_adapter.{rest}", ("cond_conv.{rest}",)),
        Rule("timestep_embedder.{rest}", ("time_embedder.timestep_embedder.{rest}",)),
        Rule("motion_embedder.{rest}", ("time_embedder.guidance_embedder.{rest}",)),
        Rule("layers.{i}.adaln.{p}", (block + "norm1.linear.{p}",)),
        Rule(
            "layers.{i}.self_attention.linear_qkv.{p}",
            tuple(block + f"attn1.{x}_proj.{{p}}" for x in "qkv"),
            **qkv,
        ),
        Rule("layers.{i}.self_attention.q_norm.weight", (block + "attn1.q_norm.weight",)),
        Rule("layers.{i}.self_attention.k_norm.weight", (block + "attn1.k_norm.weight",)),
        Rule("layers.{i}.self_attention.linear_proj.{p}", (block + "attn1.o_proj.{p}",)),
        Rule("layers.{i}.cross_norm.weight", (block + "norm2.weight",)),
        Rule("layers.{i}.cross_attention.linear_q.{p}", (block + "attn2.q_proj.{p}",)),
        Rule(
            "layers.{i}.cross_attention.linear_kv.{p}",
            tuple(block + f"attn2.{x}_proj.{{p}}" for x in "kv"),
            **kv,
        ),
        Rule("layers.{i}.cross_attention.q_norm.weight", (block + "attn2.q_norm.weight",)),
        Rule("layers.{i}.cross_attention.k_norm.weight", (block + "attn2.k_norm.weight",)),
        Rule("layers.{i}.cross_attention.linear_proj.{p}", (block + "attn2.o_proj.{p}",)),
        Rule("layers.{i}.mlp_norm.weight", (block + "norm3.weight",)),
        Rule("layers.{i}.mlp.linear_fc1.{p}", (block + "ff.fc1.{p}",)),
        Rule("layers.{i}.mlp.linear_fc2.{p}", (block + "ff.fc2.{p}",)),
        Rule("head_modulation.{p}", ("proj_out_1.{p}",)),
        Rule("head_proj.{p}", ("proj_out_2.{p}",)),
    ]


_FIELD = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template)
    for name, group in _FIELD.items():
        regex = regex.replace(re.escape("{" + name + "}"), group)
    return re.compile(regex + "$")


@dataclass(frozen=True)
class KeyGroup:
    """One of our tensors and the official tensors it is made of (several when fused)."""

    ours: str
    official: tuple[str, ...]
    rule: Rule

    def split(self, tensor: Tensor) -> list[Tensor]:
        """Our tensor -> its official tensors, in ``official`` order."""
        return self.rule.split(tensor) if self.rule.split else [tensor]

    def fuse(self, tensors: list[Tensor]) -> Tensor:
        """The official tensors (in ``official`` order) -> our tensor."""
        return self.rule.fuse(tensors) if self.rule.fuse else tensors[0]


def _groups(keys: Iterable[str], config: MfMConfig, ours_side: bool) -> list[KeyGroup]:
    """Every group whose names ``keys`` (ours or official) hold; raises on keys of no group
    and on groups with parts missing from ``keys``."""
    keys = set(keys)
    groups: list[KeyGroup] = []
    consumed: set[str] = set()
    for rule in _rules(config):
        pattern = _pattern(rule.ours if ours_side else rule.official[0])
        for key in sorted(keys):
            match = pattern.match(key)
            if match is None:
                continue
            fields = match.groupdict()
            group = KeyGroup(rule.ours.format(**fields), tuple(n.format(**fields) for n in rule.official), rule)
            names = (group.ours,) if ours_side else group.official
            missing = [n for n in names if n not in keys]
            if missing:
                raise KeyError(f"{key} needs {missing}, which the state dict lacks")
            groups.append(group)
            consumed.update(names)
    unknown = sorted(keys - consumed)
    if unknown:
        direction = "megatron_mfm" if ours_side else "official"
        raise KeyError(f"{len(unknown)} {direction} keys have no mapping, e.g. {unknown[:5]}")
    return groups


def groups_from_ours(keys: Iterable[str], config: MfMConfig) -> list[KeyGroup]:
    """The groups of our checkpoint keys (global, no ``_extra_state``)."""
    return _groups(keys, config, ours_side=True)


def groups_from_official(keys: Iterable[str], config: MfMConfig) -> list[KeyGroup]:
    """The groups of official ``Transformer3DModel`` keys."""
    return _groups(keys, config, ours_side=False)


def to_official(state: dict[str, Tensor], config: MfMConfig) -> dict[str, Tensor]:
    """Our global state dict (no ``_extra_state``) -> official ``Transformer3DModel`` keys."""
    out: dict[str, Tensor] = {}
    for group in groups_from_ours(state, config):
        out.update(zip(group.official, group.split(state[group.ours])))
    return out


def from_official(state: dict[str, Tensor], config: MfMConfig) -> dict[str, Tensor]:
    """Official ``Transformer3DModel`` state dict -> our global state dict."""
    return {g.ours: g.fuse([state[n] for n in g.official]) for g in groups_from_official(state, config)}
