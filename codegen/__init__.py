"""Lowering of fusedopt programs to fused multi-tensor Triton kernels."""
