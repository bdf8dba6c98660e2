"""Layout choices that only change speed, made by backend (`jax.default_backend()`).

Each has an override (given with each function); the results are the same either way up
to float rounding (tests/test_backend.py).

- LLM layer layout (`layer_layout`; `load_model(stacked=...)`):
  CPU: the list layout (one tree per layer, layers unrolled). XLA on CPU copies the slice
  of a stacked weight that a scan step reads before its matmul; measured on the embedded
  model (2-core CPU, `bench_edit_speed --param-layouts list,stacked`, three runs), the
  list layout was 1.14-1.30x faster to train and 1.14-1.65x faster to edit.
  GPU / TPU: the stacked layout, unedited layers run as one `lax.scan`. Not measured on
  such a device here. The reasons: XLA on GPU and TPU reads a layer's slice of a stacked
  weight in place (a dynamic slice along the leading axis is a contiguous block), and a
  scanned stack compiles one layer body instead of L (32 layers for an 8B model).
- Ridge solve over the K modules sharing a kernel shape (`solve`; EditorConfig.solve):
  CPU: "looped", one unbatched solve per module. jaxlib's CPU LAPACK kernels split a
  batched factorisation into tasks on the intra-op thread pool and block until they
  finish, which deadlocks when several host devices of a mesh factorise at once (seen on
  2 cores with 2 devices); the looped form also returns the updates separately, which
  on CPU saved a zero-padded (K, d_in, d_out) gradient copy per module (about 190 ms of
  thread time per training step on the embedded model, `jax.profiler`).
  GPU / TPU: "batched", one `vmap`ped solve (a single batched cuSOLVER / TPU call rather
  than K small ones). Not measured on such a device here.
- Hypernetwork blocks (`hypernet`; EditorConfig.hypernet): the blocks are stored as a
  tuple of separate arrays either way (the saved editor does not depend on the backend).
  CPU: "unrolled", each block's own arrays used directly. Stacking them on a block axis
  made XLA on CPU copy every slice before its matmul (rank-1024 microbenchmark on the
  embedded model's shapes: forward 123 -> 88 ms, gradient 393 -> 260 ms unrolled).
  GPU / TPU: "scanned", the blocks stacked and run as one `lax.scan` (one block body to
  compile; slices read in place). Not measured on such a device here.
"""

from __future__ import annotations

import jax

def _backend(backend: str | None) -> str:
    return jax.default_backend() if backend is None else backend


def layer_layout(backend: str | None = None) -> str:
    """"list" on CPU, "stacked" elsewhere (see the module docstring)."""
    return "list" if _backend(backend) == "cpu" else "stacked"


def solve(backend: str | None = None) -> str:
    """"looped" on CPU, "batched" elsewhere (see the module docstring)."""
    return "looped" if _backend(backend) == "cpu" else "batched"


def hypernet(backend: str | None = None) -> str:
    """"unrolled" on CPU, "scanned" elsewhere (see the module docstring)."""
    return "unrolled" if _backend(backend) == "cpu" else "scanned"
