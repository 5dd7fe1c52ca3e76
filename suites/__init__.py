"""Operation families: case grids, input factories, cost models and tolerance policies. No kernels here."""
