"""Triton kernels of the spvit ops (imported lazily by the backend modules: importing this package
does not import Triton)."""
