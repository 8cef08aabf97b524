"""Shards on disk: catalogs, buckets, stage schedule, the deterministic planner, precomputed sidecars and the streaming loader."""
