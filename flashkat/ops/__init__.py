"""Ops: one file per op, holding its Triton kernels, launchers and torch.library registration."""
