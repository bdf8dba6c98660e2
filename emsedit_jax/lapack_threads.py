"""One thread for the LAPACK library that jaxlib calls on CPU.

On the CPU backend, XLA runs `jnp.linalg` factorisations and triangular solves as calls
into SciPy's bundled OpenBLAS (jaxlib loads it through `scipy.linalg.cython_lapack`). The
editor's solves are small (48 x 48 Gram matrices, 576 x 576 with the key memory), and
OpenBLAS's own worker threads then compete with XLA's thread pool for the same cores: on
the reference machine (2 cores) a 48 x 48 triangular solve took about 1.4 ms inside a
training step instead of 0.05 ms alone, and with OpenBLAS limited to one thread training
and editing ran 5% and 4% faster over the protocol's batches
(experiments/bench_lapack_threads.py), 10% and 15% on one batch in alternating runs
(README, "Speed").

Importing the package changes nothing: the command line calls `limit()` at start, and a
library user may call it (`emsedit_jax.limit_lapack_threads()`) before editing on CPU. It
loads `scipy.linalg` (about 0.5 s here), which jaxlib would load at the first
linear-algebra call anyway. It touches only that
SciPy OpenBLAS (not NumPy's, not MKL or a system BLAS), and `EMSEDIT_JAX_LAPACK_THREADS`
overrides it: a number of threads, or `0` to leave the library as it is (and not load it).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

ENV = "EMSEDIT_JAX_LAPACK_THREADS"


def _scipy_library(filepath: str) -> bool:
    """Whether a loaded BLAS is SciPy's bundled one (scipy.libs/ on Linux and Windows,
    scipy/.dylibs/ on macOS)."""
    parent = Path(filepath).parent
    return parent.name.startswith("scipy") or parent.parent.name == "scipy"


def limit(threads: int | None = None) -> list[str]:
    """Sets SciPy's OpenBLAS (the LAPACK jaxlib uses on CPU) to `threads` threads
    (default: $EMSEDIT_JAX_LAPACK_THREADS, else 1; 0 = leave it). Returns the paths of
    the libraries changed; [] when SciPy or threadpoolctl is missing or nothing matched."""
    if threads is None:
        raw = os.environ.get(ENV, "1")
        try:
            threads = int(raw)
        except ValueError:
            raise ConfigError(f"{ENV} must be a whole number of threads (0: leave LAPACK as it is), not {raw!r}")
    if threads <= 0:
        return []
    try:
        import scipy.linalg.cython_lapack  # noqa: F401  (loads the library jaxlib will call)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    changed = []
    for lib in ThreadpoolController().lib_controllers:
        if lib.internal_api == "openblas" and _scipy_library(lib.filepath):
            lib.set_num_threads(threads)
            changed.append(lib.filepath)
    return changed
