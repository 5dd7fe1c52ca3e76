"""A hostile impl's changes to process-global torch state are undone after it and reported by name."""

from __future__ import annotations

import random

import pytest
import torch
from twinbench.harness.run import torch_state

HOSTILE = {
    "threads": lambda: torch.set_num_threads(1 if torch.get_num_threads() != 1 else 2),
    "default_dtype": lambda: torch.set_default_dtype(torch.float64),
    "grad_enabled": lambda: torch.set_grad_enabled(False),
    "deterministic_algorithms": lambda: torch.use_deterministic_algorithms(True),
    "mkldnn.enabled": lambda: setattr(torch.backends.mkldnn, "enabled", False),
    "float32_matmul_precision": lambda: torch.set_float32_matmul_precision("medium"),
    "anomaly_detection": lambda: torch.set_anomaly_enabled(True),
    "autocast.cpu.enabled": lambda: torch.set_autocast_enabled("cpu", True),
    "cuda.flash_sdp": lambda: torch.backends.cuda.enable_flash_sdp(False),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_change_is_undone_and_named(name):
    before = {s.name: s.read() for s in torch_state.SETTINGS}
    changed: set[str] = set()
    with torch_state.kept(changed):
        HOSTILE[name]()
        assert {s.name: s.read() for s in torch_state.SETTINGS} != before  # the change took effect inside
    assert changed == {name}
    assert {s.name: s.read() for s in torch_state.SETTINGS} == before


def test_rng_streams_are_restored_but_not_reported():
    torch.manual_seed(1)
    random.seed(1)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(1)
    random.seed(1)
    changed: set[str] = set()
    with torch_state.kept(changed):
        torch.manual_seed(1234)  # a kernel that reseeds
        random.seed(99)
    got = torch.rand(3), random.random()
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert changed == set()


def test_state_is_restored_when_the_impl_raises():
    threads = torch.get_num_threads()
    changed: set[str] = set()
    with pytest.raises(RuntimeError), torch_state.kept(changed):
        torch.set_num_threads(threads + 1)
        raise RuntimeError("kernel failed")
    assert torch.get_num_threads() == threads and changed == {"threads"}
