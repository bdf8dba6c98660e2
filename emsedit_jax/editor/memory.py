"""RLEdit's memory backtracking, as a fixed-shape buffer.

While a training stream is edited, the loss of batch b also includes the losses of the
stream's earlier batches j (b - back_depth < j < b), evaluated at the current weights and
weighted by time_decay ** (b - j). The buffer holds the paraphrase and locality views of
those batches stacked on a leading axis of `slots` = back_depth - 1 entries, the most
recent first, and one weight per slot; empty slots weigh 0 (they hold copies of a real
batch, so every slot's loss is finite and 0 * loss is exactly 0). Its shapes are those
of the run's Layout, so the jitted training step compiles once.

The buffer is a pure function of the batches seen so far in the stream: the training
loop carries it and, on resume, rebuilds it by pushing the same batches again.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .capture import Batch
from .objective import EditBatch


class Memory(NamedTuple):
    gen: Batch           # leaves (M, rows, S): paraphrase views, slot 0 = the previous batch
    loc: Batch           # leaves (M, rows, S): locality views
    weights: jax.Array   # (M,) time_decay ** age, 0 for empty slots


def memory_weights(n_previous: int, slots: int, time_decay: float) -> np.ndarray:
    """Weight of each slot when `n_previous` batches of the stream precede the current
    one: slot k holds the batch of age k + 1, weighted time_decay ** (k + 1) if that
    batch exists, else 0. Batches older than `slots` have no slot."""
    ages = np.arange(1, slots + 1)
    return np.where(ages <= n_previous, np.float64(time_decay) ** ages, 0.0).astype(np.float32)


def empty_memory(batch: EditBatch, slots: int) -> Memory:
    """A buffer with every slot empty (weight 0), each slot a copy of `batch`'s views."""
    def tile(a):
        return jnp.broadcast_to(a, (slots, *a.shape))

    return Memory(jax.tree.map(tile, batch.gen), jax.tree.map(tile, batch.loc), jnp.zeros((slots,), jnp.float32))


def push(memory: Memory, batch: EditBatch, n_previous: int, time_decay: float) -> Memory:
    """The buffer after `batch` has been edited: `batch` moves into slot 0, every other
    entry ages by one and the oldest drops out. `n_previous` counts the stream's batches
    before `batch`."""
    slots = memory.weights.shape[0]

    def shift(old, new):
        return jnp.concatenate([new[None], old[:-1]], axis=0)

    return Memory(jax.tree.map(shift, memory.gen, batch.gen), jax.tree.map(shift, memory.loc, batch.loc),
                  jnp.asarray(memory_weights(n_previous + 1, slots, time_decay)))
