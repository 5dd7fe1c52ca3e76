"""Peak memory of one call, per backend: allocator peak on GPUs, sampled resident set size on the CPU.

What each number means and where it under- or over-counts: docs/method.md §3.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from twinbench.harness.core.devices import Device

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_heap() -> None:
    """Give freed heap back to the OS so the next call's growth shows in RSS (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class RssSampler:
    """Samples RSS every ``interval_s`` on a thread while a call runs (torch releases the GIL in kernels)."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def peak_memory(device: Device, fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak bytes above the starting level while ``fn`` runs once (the call's own working memory)."""
    backend = device.backend
    if backend in ("cuda", "rocm", "xpu"):
        # every call names the device: without one they read the current device, maybe another GPU
        api, name = (torch.xpu, "torch.xpu") if backend == "xpu" else (torch.cuda, "torch.cuda")
        api.synchronize(device.torch_device)
        api.reset_peak_memory_stats(device.torch_device)
        start = api.memory_allocated(device.torch_device)
        fn()
        api.synchronize(device.torch_device)
        return {"peak_bytes": int(api.max_memory_allocated(device.torch_device) - start),
                "method": f"{name}.max_memory_allocated"}
    if backend == "mps":
        # MPS has no peak counter and the driver's allocation at the end of the call reads ~0 (freed blocks
        # stay cached): count live tensors exactly instead (docs/method.md §3).
        torch.mps.synchronize()
        with TensorPeak() as watched:
            fn()
        torch.mps.synchronize()
        return {"peak_bytes": int(watched.peak), "method": TensorPeak.METHOD}
    release_freed_heap()
    with RssSampler() as sampler:
        start = sampler.peak
        fn()
    return {"peak_bytes": int(max(0, sampler.peak - start)), "method": "rss-sampler"}


class TensorPeak:
    """Peak bytes of tensor storages allocated inside the block and alive at the same time: on the CPU the
    analogue of ``torch.cuda.max_memory_allocated`` above the start, exact where RSS is sampled and carries
    the heap's fragmentation and the interpreter's own objects.

    Every ATen op's outputs are watched (a ``TorchDispatchMode``; forward and backward, custom ops included).
    An output whose storage is not one of the op's inputs' (views, in-place and ``out=`` results are) is an
    allocation; a weak reference to the storage notices when it is freed. Not counted: storages allocated
    before the block (parameters, optimizer state, cached workspaces) and the relief when one of them is freed
    inside it; the allocator's rounding. Slows each op by Python-level bookkeeping: time a block without it.
    """

    METHOD = "tensor-peak (live tensor storages allocated in the call; no allocator rounding)"

    def __init__(self) -> None:
        self.peak = 0
        self._current = 0
        self._live: dict[int, tuple[Any, int]] = {}
        self._mode: Any = None

    def _note(self, inputs: list[Any], outputs: list[Any]) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        new = []
        for t in outputs:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                known = self._live.get(ptr)
                if known is not None and known[0].expired():  # a freed block's address, handed out again
                    del self._live[ptr]
                    self._current -= known[1]
                    known = None
                if ptr and ptr not in seen and known is None:
                    new.append((ptr, StorageWeakRef(storage), storage.nbytes()))
                    seen.add(ptr)
        if not new:
            return
        for ptr, (ref, nbytes) in list(self._live.items()):  # frees since the last allocation
            if ref.expired():
                del self._live[ptr]
                self._current -= nbytes
        for ptr, ref, nbytes in new:
            self._live[ptr] = (ref, nbytes)
            self._current += nbytes
        self.peak = max(self.peak, self._current)

    def __enter__(self) -> TensorPeak:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        note = self._note

        class _Watch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                note(tree_leaves((args, kwargs)), tree_leaves(out))
                return out

        self._mode = _Watch()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._live.clear()
