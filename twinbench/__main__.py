"""``python -m twinbench``: the same command as ``twinbench``."""

import sys

from twinbench.harness.cli.main import main

sys.exit(main())
