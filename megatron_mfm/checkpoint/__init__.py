"""Checkpoints: the layout (``layout``), model weights (``model_state``) and the full training
state (``training_state``). Nothing here depends on ``megatron_mfm.training``."""
