"""Pieces of `python -m spvit_kernels.evaluate`: the data set and its sharding, the measured loop, the result."""
