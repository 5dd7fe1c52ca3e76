"""twinbench's engine: knows no operation by name (see docs/architecture.md for its layers)."""

from pathlib import Path

# The folder that holds the layer folders (harness/, suites/, impls/, ...): the checkout's root in a source
# tree, the installed ``twinbench`` package in a wheel. Workers start here; `gate --against` gates this tree.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
