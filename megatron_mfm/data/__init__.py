"""Data: the sample interface, the built-in synthetic dataset, frozen encoders and the loader."""
