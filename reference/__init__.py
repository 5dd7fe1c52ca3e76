"""Plain-PyTorch references: readable in a minute, dtype-following so they can run upcast."""
