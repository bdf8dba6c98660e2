"""One edit step and the T-step edit (a `jax.lax.scan`; with a net per step, a static unroll).

A step, on the current model params + deltas, for a batch of requests:
capture keys and value gradients -> normalise [u; g] -> hypernetwork -> pseudo keys and
value gradients -> weight update (ridge solve, or MEND's rank-1 sum) -> scaled down to
at most EditorConfig.max_update ||W|| (the trust region; off = the paper's) -> deltas += dW.
The editor state is explicit: `nets` (hypernetwork parameters, a tuple of P = T or 1
parameter sets per kernel shape), `stats` (normaliser statistics, stacked on a leading
P axis) and, with key memory (EditorConfig.key_memory > 0), `key_gram`: per kernel shape,
the Gram matrices (K, d_in, d_in) of the keys edited so far in the current stream, and
with EditorConfig.null_space > 0, `protect`: the projections P (K, d_in, d_in) applied
to every update (null_space_projection). A trained editor with a locality prior
(EditorConfig.loc_prior / null_space) also holds `prior`: C0, the preserved keys' mean
k k^T it was trained with, from which `new_stream` starts every stream (and which the
stream's own state then drops). All plain pytrees.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..models.config import ModelConfig
from ..models.layers import Array, Params
from ..models.transformer import get_kernel, module_shape
from . import normalizer, solve
from .capture import Batch, Capture, Prefix, capture
from .config import EditorConfig
from .hypernet import apply_net, init_net

Deltas = dict[str, Array]


class EditorState(NamedTuple):
    nets: dict[str, tuple[dict, ...]]      # shape key -> P nets (hypernet.init_net), step t at its rank
    stats: dict[str, normalizer.Stats]     # shape key -> normaliser stats, leading axis P
    key_gram: dict[str, Array] = {}        # shape key -> (K, d_in, d_in); {} without key memory
    protect: dict[str, Array] = {}         # shape key -> (K, d_in, d_in) projections P; {} without null_space
    prior: dict[str, Array] = {}           # shape key -> C0 (K, d_in, d_in) of a trained editor; {} otherwise


def groups(ecfg: EditorConfig, lcfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Modules grouped by kernel shape: one hypernetwork per group, key 'd_inxd_out'."""
    out: dict[str, list[str]] = {}
    for name in ecfg.modules:
        d_in, d_out = module_shape(lcfg, name)
        out.setdefault(f"{d_in}x{d_out}", []).append(name)
    return {k: tuple(v) for k, v in out.items()}


def init_editor(ecfg: EditorConfig, lcfg: ModelConfig, key: Array) -> EditorState:
    nets, stats = {}, {}
    for g, (shape_key, names) in enumerate(sorted(groups(ecfg, lcfg).items())):
        d_in, d_out = module_shape(lcfg, names[0])
        keys = jax.random.split(jax.random.fold_in(key, g), ecfg.n_param_sets)
        lr0 = float(np.log(ecfg.lr_init)) if ecfg.log_step_size else ecfg.lr_init
        nets[shape_key] = tuple(init_net(k, d_in, d_out, len(names), rank, ecfg.n_blocks, lr0, ecfg.lamda_init)
                                for k, rank in zip(keys, ecfg.step_ranks()))
        stats[shape_key] = jax.tree.map(lambda x: jnp.stack([x] * ecfg.n_param_sets),
                                        normalizer.init_stats(d_in + d_out))
    return EditorState(nets, stats, empty_key_gram(ecfg, lcfg))


def empty_key_gram(ecfg: EditorConfig, lcfg: ModelConfig) -> dict[str, Array]:
    """The key memory at the start of a stream: zeros, or {} when it is off."""
    if not ecfg.key_memory:
        return {}
    return {key: jnp.zeros((len(names), *(module_shape(lcfg, names[0])[0],) * 2), jnp.float32)
            for key, names in groups(ecfg, lcfg).items()}


def null_space_projection(c0: Array, tau: float) -> Array:
    """P = I - V V^T for C0 (..., d, d) symmetric PSD, V its eigenvectors with
    eigenvalue > tau * the largest (AlphaEdit's null-space projection): for any dW,
    k^T (P dW) = 0 for every k in the span of V."""
    c0 = jnp.asarray(c0, jnp.float32)
    vals, vecs = jnp.linalg.eigh(c0)
    keep = (vals > tau * vals[..., -1:]).astype(c0.dtype)            # eigh: ascending
    return jnp.eye(c0.shape[-1], dtype=c0.dtype) - jnp.einsum("...ij,...j,...kj->...ik", vecs, keep, vecs)


def new_stream(ecfg: EditorConfig, lcfg: ModelConfig, state: EditorState,
               prior: Mapping[str, Array] | None = None) -> EditorState:
    """`state` for editing a fresh model: the key memory emptied (nets, stats kept), or,
    with ecfg.loc_prior = nu > 0, set to (nu / mu) * prior, `prior` mapping shape key ->
    (K, d_in, d_in) mean k k^T of unrelated prompts' keys (evaluate.preserved_gram;
    None: the editor's own, `state.prior`); with ecfg.null_space > 0 also the
    projections onto the null space of `prior`. The returned stream state holds no
    `prior` (the jitted steps never need it)."""
    if prior is None and state.prior:
        prior = state.prior
    state = state._replace(key_gram=empty_key_gram(ecfg, lcfg), protect={}, prior={})
    if not ecfg.needs_prior:
        return state
    if prior is None:
        raise ValueError("loc_prior / null_space is on but the editor holds no C0 and none was given: compute it "
                         "with evaluate.preserved_gram(model, ecfg, requests)")
    shapes = {key: (len(names), *(module_shape(lcfg, names[0])[0],) * 2) for key, names in groups(ecfg, lcfg).items()}
    if set(prior) != set(shapes) or any(tuple(prior[k].shape) != shapes[k] for k in shapes):
        raise ValueError(f"prior Gram matrices of shapes { {k: v.shape for k, v in prior.items()} } do not match "
                         f"the edited modules' {shapes}")
    if ecfg.loc_prior:
        scale = ecfg.loc_prior / ecfg.key_memory
        state = state._replace(key_gram={k: scale * jnp.asarray(prior[k], jnp.float32) for k in shapes})
    if ecfg.null_space:
        state = state._replace(protect={k: null_space_projection(prior[k], ecfg.null_space) for k in shapes})
    return state


def masked_keys(ecfg: EditorConfig, lcfg: ModelConfig, cap: Capture) -> dict[str, Array]:
    """Per kernel shape, the capture's keys with padding slots zeroed: (K, N, d_in) float32."""
    mask = cap.mask.reshape(-1, 1)
    out = {}
    for key, names in groups(ecfg, lcfg).items():
        d_in = module_shape(lcfg, names[0])[0]
        out[key] = jnp.stack([cap.keys[m].reshape(-1, d_in) * mask for m in names]).astype(jnp.float32)
    return out


def zero_deltas(ecfg: EditorConfig, lcfg: ModelConfig, dtype=jnp.float32) -> Deltas:
    return {m: jnp.zeros(module_shape(lcfg, m), dtype) for m in ecfg.modules}


def trust_region(dw: Array, bound: Array) -> Array:
    """dw scaled down to Frobenius norm `bound` where it is longer (EditorConfig.max_update)."""
    wide = dw.astype(jnp.promote_types(dw.dtype, jnp.float32))       # bfloat16 norms in float32
    norm = jnp.sqrt(jnp.sum(jnp.square(wide)))
    return dw * jnp.minimum(1.0, bound.astype(wide.dtype) / jnp.maximum(norm, 1e-30)).astype(dw.dtype)


def update_bounds(ecfg: EditorConfig, lcfg: ModelConfig, params: Params) -> dict[str, Array]:
    """Per module, the largest update norm a step may make: ecfg.max_update * ||W||_F
    ({} without a cap)."""
    if not ecfg.max_update:
        return {}
    return {m: ecfg.max_update * jnp.sqrt(jnp.sum(jnp.square(get_kernel(lcfg, params, m).astype(jnp.float32))))
            for m in ecfg.modules}


def slot_sums(net: dict, stats: normalizer.Stats, keys: list[Array], grads: list[Array], maskf: Array,
              lr: Array, eps: float, scanned: bool, size: int) -> tuple[Array, Array]:
    """The ridge solve's sums over the slots of K modules' keys (N, d_in) and value
    gradients (N, d_out), `size` slots at a time: UᵀU (K, d_in, d_in) and UᵀD
    (K, d_in, d_out), D = -lr (u · ũ) g̃ of the hypernetwork's outputs. Only one chunk's
    slots are stacked into the hypernetwork's (K, size, d_in + d_out) input at a time, so
    a batch of thousands of edits holds its keys and value gradients once, not copies of
    them and every slot's pass through the hypernetwork (step_update with `slot_chunk`)."""
    n, d_in = keys[0].shape
    m = -(-n // size)
    if m * size > n:                                                   # padding slots: masked
        keys, grads = ([jnp.pad(a, ((0, m * size - n), (0, 0))) for a in arrays] for arrays in (keys, grads))
        maskf = jnp.pad(maskf, (0, m * size - n))

    def body(i, sums):
        def chunk(a):
            return jax.lax.dynamic_slice_in_dim(a, i * size, size)
        x_c = jnp.stack([jnp.concatenate([chunk(u), chunk(g)], axis=-1) for u, g in zip(keys, grads)])
        m_c = chunk(maskf)[None, :, None]
        u_c = x_c[..., :d_in] * m_c
        out = apply_net(net, normalizer.normalise(stats, x_c, eps) * m_c, scanned=scanned)
        d = (-lr * jnp.sum(u_c * out[..., :d_in], axis=-1))[..., None] * out[..., d_in:] * m_c
        return sums[0] + jnp.einsum("kni,knj->kij", u_c, u_c), sums[1] + jnp.einsum("kni,knj->kij", u_c, d)

    dtype = keys[0].dtype
    zeros = (jnp.zeros((len(keys), d_in, d_in), dtype), jnp.zeros((len(keys), d_in, grads[0].shape[1]), dtype))
    return jax.lax.fori_loop(0, m, body, zeros)


def step_update(ecfg: EditorConfig, lcfg: ModelConfig, nets: Mapping, stats: Mapping, cap: Capture,
                key_gram: Mapping | None = None, protect: Mapping | None = None,
                bounds: Mapping | None = None, slot_chunk: int | None = None) -> tuple[Deltas, dict]:
    """Weight updates of one step from a capture, with one parameter set: `nets` maps
    shape key -> one net, `stats` shape key -> its Stats (no P axis).
    `key_gram` (shape key -> (K, d_in, d_in)): the key memory, weighted by
    ecfg.key_memory in the ridge solve; `protect` (shape key -> (K, d_in, d_in)): the
    projections P every update is multiplied by (P dW; EditorConfig.null_space); `bounds`
    (module -> scalar, update_bounds): the trust region of each update (EditorConfig.max_update).
    `slot_chunk`: run the hypernetwork and the ridge solve's sums that many slots at a
    time (slot_sums; the same updates up to rounding). Returns ({module: dW (d_in, d_out)},
    updated stats)."""
    mask = cap.mask.reshape(-1)
    new_stats, deltas = {}, {}
    for key, names in groups(ecfg, lcfg).items():
        d_in = module_shape(lcfg, names[0])[0]
        dtype = nets[key]["lr"].dtype                               # editor precision
        keys = [cap.keys[m].reshape(mask.shape[0], d_in).astype(dtype) for m in names]
        grads = [cap.grads[m].reshape(mask.shape[0], -1).astype(dtype) for m in names]
        k = len(names)
        maskf = mask.astype(dtype)
        prior = None if not key_gram else (ecfg.key_memory * key_gram[key]).astype(dtype)
        lr = ecfg.step_size(nets[key]["lr"])[:, None]
        scanned = ecfg.hypernet_mode() == "scanned"
        if slot_chunk and ecfg.update_rule == "ridge" and mask.shape[0] > slot_chunk:
            st = stats[key]
            for u_m, g_m in zip(keys, grads):       # the K modules' slots, merged one module at a time
                st = normalizer.update(st, (u_m, g_m), mask)
            new_stats[key] = st
            uu, ud = slot_sums(nets[key], st, keys, grads, maskf, lr, ecfg.norm_eps, scanned, slot_chunk)
            dws = solve.ridge_from_sums(uu, ud, nets[key]["lamda"], prior)
        else:
            u, g = jnp.stack(keys), jnp.stack(grads)
            x = jnp.concatenate([u, g], axis=-1)                       # (K, N, D)
            new_stats[key] = st = normalizer.update(stats[key], x.reshape(k * x.shape[1], -1), jnp.tile(mask, k))
            h = normalizer.normalise(st, x, ecfg.norm_eps) * maskf[None, :, None]
            out = apply_net(nets[key], h, scanned=scanned)
            u_t, g_t = out[..., :d_in], out[..., d_in:]
            if ecfg.update_rule == "rank1":
                dws = [solve.rank1(u_t[i] * maskf[:, None], -lr[i] * g_t[i] * maskf[:, None]) for i in range(k)]
            else:
                coeff = -lr * jnp.sum(u * u_t, axis=-1)                 # (K, N)
                d = coeff[..., None] * g_t * maskf[None, :, None]
                ridge = solve.ridge_batched if ecfg.solve_mode() == "batched" else solve.ridge_each
                dws = ridge(u * maskf[None, :, None], d, nets[key]["lamda"], prior)
        if protect:
            dws = [protect[key][i].astype(dtype) @ dw for i, dw in enumerate(dws)]
        if bounds:
            dws = [trust_region(dw, bounds[m]) for dw, m in zip(dws, names)]
        deltas.update({m: dws[i] for i, m in enumerate(names)})
    return deltas, new_stats


def multi_step_edit(ecfg: EditorConfig, lcfg: ModelConfig, params: Params, state: EditorState,
                    batch: Batch, deltas: Deltas, *, n_answer: int, prefix: Prefix | None = None,
                    remat: bool = False, chunk: int | None = None) -> tuple[Deltas, EditorState, Deltas]:
    """Applies T edit steps to params + deltas for `batch`.
    Returns (new deltas, editor state with updated stats and key memory, the per-step
    updates stacked on a leading T axis). `chunk`: capture in microbatches of that many
    rows, and run the hypernetwork and the ridge solve's sums over that many rows' slots
    at a time (memory; the same result up to rounding). With key memory, every step's
    solve is weighted against the keys of the stream's earlier batches, and this batch's
    keys (from its last step's capture) are then added to the memory."""
    memory = state.key_gram if ecfg.key_memory else {}
    if ecfg.key_memory and not memory:
        raise ValueError("key_memory is on but the editor state holds no key memory: start each stream with "
                         "steps.new_stream(ecfg, lcfg, state) (or init_editor / load_editor with this ecfg)")

    bounds = jax.lax.stop_gradient(update_bounds(ecfg, lcfg, params))
    shared = ecfg.n_param_sets == 1       # one net for every step; else step t uses set t

    def update(p, stats, cap):
        """The step's weight updates with parameter set p (a Python int)."""
        nets_p = {key: sets[p] for key, sets in state.nets.items()}
        stats_p = jax.tree.map(lambda a: a[p], stats)
        dws, st = step_update(ecfg, lcfg, nets_p, stats_p, cap, memory, state.protect, bounds,
                              slot_chunk=None if chunk is None else chunk * ecfg.key_slots(n_answer))
        return dws, jax.tree.map(lambda s, n: s.at[p].set(n), stats, st)

    def body(carry, t):
        deltas, stats, _ = carry
        cap = capture(lcfg, params, batch, ecfg.modules, deltas, n_answer=n_answer, prefix=prefix, remat=remat,
                      chunk=chunk, key_positions=ecfg.key_positions)
        if ecfg.msbp == "detached":
            cap = cap._replace(keys=jax.lax.stop_gradient(cap.keys), grads=jax.lax.stop_gradient(cap.grads))
        dws, stats = update(0 if shared else t, stats, cap)
        keys = jax.lax.stop_gradient(masked_keys(ecfg, lcfg, cap)) if memory else {}
        return ({m: deltas[m] + dws[m] for m in deltas}, stats, keys), dws

    # The carry keeps the latest step's keys; their Gram matrices join the memory once.
    n_slots = batch.input_ids.shape[0] * ecfg.key_slots(n_answer)
    no_keys = {key: jnp.zeros((g.shape[0], n_slots, g.shape[1]), jnp.float32) for key, g in memory.items()}
    carry = (dict(deltas), state.stats, no_keys)
    if shared:
        # One net for every step: a scan, unroll=True so that XLA gets the T steps as
        # straight-line code (rolled, a training step spent about a third more time
        # outside the matmuls; CPU profile).
        (deltas, stats, last_keys), per_step = jax.lax.scan(body, carry, jnp.arange(ecfg.steps), unroll=True)
    else:
        # A net per step, each at its own rank (so not stacked): a static unroll, step t
        # calling its own set. As a scan the step index is traced and each step a
        # `lax.switch` over every set: a conditional in the compiled program, every
        # branch linearised and transposed in every step (experiments/README, "A net per
        # step without a conditional").
        steps = []
        for t in range(ecfg.steps):
            carry, dws = body(carry, t)
            steps.append(dws)
        (deltas, stats, last_keys), per_step = carry, jax.tree.map(lambda *a: jnp.stack(a), *steps)
    memory = {key: g + jnp.einsum("kni,knj->kij", last_keys[key], last_keys[key]) for key, g in memory.items()}
    return deltas, EditorState(state.nets, stats, memory, state.protect), per_step
