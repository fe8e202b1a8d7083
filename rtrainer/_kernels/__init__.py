"""Compiled Cython kernels (sources in the repository's kernels/ folder)."""
