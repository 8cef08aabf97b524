"""Checkpoint layout (latest, names, prefixes), model state and training state."""
