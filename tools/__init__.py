"""User tools: sampling, checkpoint conversion and inspection, checks against the official code."""
