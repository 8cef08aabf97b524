"""Flow matching: training noise/targets/loss and the Euler sampler with guidance."""
