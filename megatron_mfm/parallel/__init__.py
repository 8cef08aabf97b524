"""Process groups, the CPU compatibility layer and (later) context-parallel splitting."""
