"""twinbench: paired reference/optimized kernels, their parity and their performance.

One import namespace over the repository's layer folders: ``twinbench.harness`` (the engine),
``twinbench.suites``, ``twinbench.reference``, ``twinbench.impls`` and ``twinbench.reports``.
An installed wheel holds them inside this package; in a source checkout (editable install, or
``PYTHONPATH`` at the checkout, as the gate's base worktree runs) they are the top-level folders
beside this one, so the package's search path also covers the checkout's root. Which layer may import
which: docs/architecture.md; the method the harness implements: docs/method.md.
"""

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "harness")):  # a source checkout, not an installed wheel
    __path__.append(_os.path.dirname(_here))  # noqa: F821 (a package's own __path__)
