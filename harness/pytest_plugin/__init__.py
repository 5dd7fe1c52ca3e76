"""twinbench as a pytest plugin (entry point ``pytest11``): parity and timing items for the impls a vendor's
installed plugins register, and a fixture with a suite's inputs for a case. :mod:`.plugin` holds the hooks
(cheap to import, off unless ``--twinbench``); :mod:`.session` plans and runs through ``harness.run``."""
