"""Benchmarks for fusedopt: one optimizer step over named parameter lists, against torch.optim.

Run ``python -m benchmarks.bench_step --help``; see benchmarks/README.md for what each column means.
"""
