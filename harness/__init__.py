"""twinbench's engine: knows no operation by name (see docs/adding-an-op.md)."""

__version__ = "0.1.0"
