"""Parallel placement, apart from the model math: process groups, autograd collectives,
context parallelism (token layout, all-to-all and ring attention, the head's gather) and the CPU
compatibility layer for megatron-core."""
