"""Frozen encoders: the interface, the built-in codec and text encoder, and the pretrained CogVideoX VAE, T5 and Depth-Anything-V2."""
