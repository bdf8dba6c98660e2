"""JAX's persistent compilation cache: compile once per machine, not once per process.

Every process would otherwise compile its jitted steps from scratch (tens of seconds for
the embedded model's edit and training steps on a 2-core CPU). With the cache on, XLA's
compiled programs are written to a folder and a later process with the same shapes,
configuration, JAX version and XLA flags loads them instead of compiling.

The cache is never switched on by importing this package. The command line switches it
on (`emsedit-jax ... --compile-cache-dir DIR`, off with `--no-compile-cache`); a library user
calls `enable()`. The folder is, in order: the `path` argument; `$EMSEDIT_JAX_COMPILE_CACHE`
(a folder, or `off` / `0` / `false` / `no` / an empty string to switch the cache off); else
`<cache root>/xla`, the cache root being that of the embedded model
(`$EMSEDIT_JAX_CACHE`, else `~/.cache/emsedit_jax`).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "EMSEDIT_JAX_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "")
# Every program is worth a file: a training process also compiles about 26 small ones
# (initialisation, placement, eager operations), 10-250 ms each, 1.6 s in all on the
# reference machine, which load from the cache in 0.14 s.
MIN_COMPILE_SECONDS = 0.0


def cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The folder `enable(path)` would use; None when the cache is switched off."""
    if path is not None:
        return Path(path).expanduser()
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    from .models.embedded import embedded_cache_dir
    return embedded_cache_dir() / "xla"


def enable(path: str | os.PathLike | None = None, *, min_compile_seconds: float = MIN_COMPILE_SECONDS
           ) -> Path | None:
    """Switches JAX's persistent compilation cache on in `cache_dir(path)` (created if
    needed) for programs that take at least `min_compile_seconds` to compile. Returns the
    folder, or None (and changes nothing) when the cache is switched off. Call it before
    the first compilation: JAX sets its cache up once per process."""
    folder = cache_dir(path)
    if folder is None:
        return None
    import jax
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
