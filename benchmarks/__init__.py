"""Benchmarks: training throughput (MFU), attention kernels, data loading; GPU session scripts in gpu/."""
