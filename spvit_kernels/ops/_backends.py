"""Imports the modules that register the fast backends (C++, CUDA C++, Triton) of the ops."""
