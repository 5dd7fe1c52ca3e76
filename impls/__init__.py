"""Optimized implementations, one file each; every impl says where it can run and why not."""
