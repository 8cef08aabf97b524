"""megatron_mfm: pretraining the Many-for-Many (MfM) video DiT on megatron-core."""
