"""The FLOPs formula against a count by hand."""

from __future__ import annotations

from megatron_mfm.model.config import make_config
from megatron_mfm.training.flops import layer_forward_flops, training_flops, forward_flops


def test_one_layer_by_hand():
    # d=64, ffn=256, text width 32, S=10 video tokens, L=5 text tokens.
    config = make_config(num_layers=1, hidden_size=64, num_attention_heads=4, text_hidden_size=32)
    by_hand = (
        2 * 64 * 384           # adaLN: (1 x 64) @ (64 x 384)
        + 2 * 10 * 64 * 192    # q, k, v projections
        + 2 * 10 * 10 * 64     # Q K^T over all heads
        + 2 * 10 * 10 * 64     # P V
        + 2 * 10 * 64 * 64     # self-attention output projection
        + 2 * 10 * 64 * 64     # cross-attention q
        + 2 * 5 * 32 * 128     # cross-attention k and v from text
        + 2 * 10 * 5 * 64 * 2  # cross-attention Q K^T and P V
        + 2 * 10 * 64 * 64     # cross-attention output projection
        + 2 * 10 * 64 * 256    # fc1
        + 2 * 10 * 256 * 64    # fc2
    )
    assert layer_forward_flops(config, tokens=10, text_tokens=5) == by_hand


def test_training_is_three_forwards_and_layers_scale():
    one = make_config(num_layers=1, hidden_size=64, num_attention_heads=4, text_hidden_size=32)
    two = make_config(num_layers=2, hidden_size=64, num_attention_heads=4, text_hidden_size=32)
    shape = (3, 4, 6)
    assert training_flops(one, shape, 7) == 3 * forward_flops(one, shape, 7)
    tokens = 3 * 2 * 3
    assert forward_flops(two, shape, 7) - forward_flops(one, shape, 7) == layer_forward_flops(one, tokens, 7)
