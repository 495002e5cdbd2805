"""Benchmarks of hpc-kernels: kernel start latency, CLI responsiveness, scale, memory, image compression."""
