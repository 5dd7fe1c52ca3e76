"""Building the native CPU kernels (impls/kernels/*.c) with the system C compiler at first use, and caching them.

One function for every native kernel file: the shared object lives under ``$TWINBENCH_CACHE_DIR`` (default
``$XDG_CACHE_HOME/twinbench`` or ``~/.cache/twinbench``) in ``<name>/<hash>.so``, the hash covering the source,
the flags and the compiler's version, so an edit, another vector layer or another compiler gets its own build.
It is built into a temporary file and renamed into place, so concurrent first uses (two workers, two test
processes) are safe: the rename is atomic and both results are the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("TWINBENCH_CACHE_DIR"):
        return Path(os.environ["TWINBENCH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "twinbench"


def build_shared_library(cc: str, source: Path, flags: list[str], name: str, libs: tuple[str, ...] = ()) -> Path:
    """The cached shared object for ``source`` built by ``cc`` with ``flags`` (built now if absent); ``libs``
    (``-L``/``-l``/``-Wl`` arguments) go after the source, where linkers that drop unused libraries need them."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(source.read_bytes() + " ".join([*flags, *libs]).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / name / f"{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(source), *libs, "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
