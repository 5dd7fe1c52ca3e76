"""`twinbench doctor`: the harness validates itself on a device before anyone trusts its numbers there."""
