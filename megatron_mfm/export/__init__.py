"""Conversion between megatron_mfm checkpoints and the official MfM layout."""
