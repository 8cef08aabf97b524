"""The training loop around megatron-core: steps, optimizer, checkpoints, EMA, logging, FLOPs."""
