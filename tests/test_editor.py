"""The editor's building blocks: identity hypernetwork at initialisation, the ridge
solve's gradient against the hand-written adjoint, MSBP gradients (detached and exact)
against float64 finite differences, the normaliser's merge, exact rollback, and the key memory (an extension)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emsedit_jax.editor import normalizer, solve
from emsedit_jax.editor.capture import IGNORE, Batch, capture, edited_loss
from emsedit_jax.editor.config import EditorConfig
from emsedit_jax.editor.hypernet import apply_net, init_net
from emsedit_jax.editor.steps import (EditorState, init_editor, multi_step_edit, new_stream, step_update,
                                      update_bounds, zero_deltas)
from emsedit_jax.models import ModelConfig, apply_deltas, init_params
from emsedit_jax.models.transformer import get_kernel

TINY = ModelConfig.from_hf(dict(model_type="llama", vocab_size=53, hidden_size=16, intermediate_size=24,
                                num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                tie_word_embeddings=True))
MODULES = ("model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj")


def tiny_batch(seed, b=3, s=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, size=(b, s)).astype(np.int32)
    lengths = np.array([s, s - 1, s - 2])[:b]
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    labels = np.full((b, s), IGNORE, np.int32)
    for r, n in enumerate(lengths):
        labels[r, n - 2:n] = rng.integers(1, TINY.vocab_size, size=2)
    return Batch(jnp.asarray(ids * mask), jnp.asarray(mask), jnp.asarray(labels))


def test_hypernet_is_identity_at_init():
    net = init_net(jax.random.key(0), 5, 7, n_layers=3, rank=4, n_blocks=3, lr_init=1e-3, lamda_init=0.0)
    h = jax.random.normal(jax.random.key(1), (3, 11, 12))
    np.testing.assert_array_equal(np.asarray(apply_net(net, h)), np.asarray(h))
    # ...and not the identity once B is non-zero (the test can fail).
    net["blocks"][1]["B"] = net["blocks"][1]["B"] + 0.1
    assert not np.allclose(np.asarray(apply_net(net, h)), np.asarray(h))


def test_hypernet_blocks_receive_gradient_at_init():
    """B = 0 and b = 0 put every pre-activation at exactly 0: the ReLU must pass
    gradient there or the blocks never train."""
    net = init_net(jax.random.key(0), 5, 7, n_layers=2, rank=4, n_blocks=2, lr_init=1e-3, lamda_init=0.0)
    h = jax.random.normal(jax.random.key(1), (2, 6, 12))
    target = jax.random.normal(jax.random.key(2), (2, 6, 12))
    grads = jax.grad(lambda n: jnp.sum((apply_net(n, h) - target) ** 2))(net)
    for i, blk in enumerate(grads["blocks"]):
        for name in ("B", "b", "shift"):
            assert float(jnp.abs(blk[name]).max()) > 0, (i, name)


def test_ridge_gradient_matches_handwritten_adjoint():
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        for n, d_in in [(5, 8), (12, 8)]:         # dual and primal forms
            u = jax.random.normal(k1, (n, d_in), jnp.float64)
            d = jax.random.normal(k2, (n, 6), jnp.float64)
            lam = jnp.asarray(0.3, jnp.float64)
            c = jax.random.normal(k3, (d_in, 6), jnp.float64)    # L = <C, dW>, so dL/dW = C
            dw = solve.ridge(u, d, lam)
            np.testing.assert_allclose(dw, solve.ridge_primal(u, d, lam), rtol=1e-10, atol=1e-12)
            g_d, g_lam = jax.grad(lambda d, lam: jnp.sum(c * solve.ridge(u, d, lam)), argnums=(0, 1))(d, lam)
            m = jnp.linalg.solve(u.T @ u + jnp.exp(lam) * jnp.eye(d_in), c)
            np.testing.assert_allclose(g_d, u @ m, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(g_lam, -jnp.exp(lam) * jnp.sum(m * dw), rtol=1e-9)


def test_cholesky_solve_matches_lu_in_value_and_gradient():
    """spd_solve (Cholesky, its own backward pass) against jnp.linalg.solve (LU, JAX's
    derivative) in float64: the ridge update with and without the key-memory prior, and
    its gradient with respect to the keys, the value gradients, the step size and the prior."""
    def lu_ridge(u, d, lam, prior):
        gram = u.T @ u + jnp.exp(lam) * jnp.eye(u.shape[1], dtype=u.dtype) + prior
        return jnp.linalg.solve(gram, u.T) @ d

    with jax.enable_x64(True):
        k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
        u = jax.random.normal(k1, (5, 8), jnp.float64)
        d = jax.random.normal(k2, (5, 6), jnp.float64)
        a = jax.random.normal(k3, (8, 8), jnp.float64)
        prior = a @ a.T / 8
        c = jax.random.normal(k4, (8, 6), jnp.float64)
        lam = jnp.asarray(-0.4, jnp.float64)
        for p in (prior, jnp.zeros_like(prior)):
            ours = jax.value_and_grad(lambda *x: jnp.sum(c * solve.ridge(*x)), argnums=(0, 1, 2, 3))(u, d, lam, p)
            ref = jax.value_and_grad(lambda *x: jnp.sum(c * lu_ridge(*x)), argnums=(0, 1, 2, 3))(u, d, lam, p)
            chex.assert_trees_all_close(ours, ref, rtol=1e-9, atol=1e-12)
        # the dual form (no prior, fewer keys than inputs), gradient with respect to the keys
        dual = jax.grad(lambda u: jnp.sum(c * solve.ridge(u, d, lam)))(u)
        np.testing.assert_allclose(dual, jax.grad(lambda u: jnp.sum(c * solve.ridge_primal(u, d, lam)))(u),
                                   rtol=1e-9, atol=1e-12)


def test_normaliser_merge_equals_full_statistics():
    x = np.random.default_rng(0).normal(size=(40, 5)) * 3 + 1
    mask = np.random.default_rng(1).random(40) > 0.3
    st = normalizer.init_stats(5)
    for part in np.array_split(np.arange(40), 4):
        st = normalizer.update(st, jnp.asarray(x[part]), jnp.asarray(mask[part]))
    rows = x[mask]
    assert float(st.count) == len(rows)
    np.testing.assert_allclose(st.mean, rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(st.m2 / (st.count - 1), rows.var(0, ddof=1), rtol=1e-4)
    np.testing.assert_allclose(normalizer.normalise(st, jnp.asarray(x)), (x - rows.mean(0)) / rows.std(0, ddof=1),
                               rtol=1e-4, atol=1e-5)


def test_normaliser_of_one_row_passes_it_unchanged():
    """Fresh statistics updated with a single row (one answer token, one module) have no
    spread: standardising would zero the row, so it passes as it is; from two rows on it
    is standardised."""
    x = jnp.asarray([[1.0, -2.0, 3.0], [0.5, 0.0, 1.0]])
    one = normalizer.update(normalizer.init_stats(3), x[:1], jnp.asarray([True]))
    np.testing.assert_array_equal(normalizer.normalise(one, x[:1]), x[:1])
    two = normalizer.update(normalizer.init_stats(3), x, jnp.asarray([True, True]))
    np.testing.assert_allclose(normalizer.normalise(two, x), (x - x.mean(0)) / (x.std(0, ddof=1) + 1e-5), rtol=1e-5)


@functools.partial(jax.jit, static_argnums=(0, 1))     # one compile instead of many eager ops
def _setup(ecfg, dtype=jnp.float32):
    params = init_params(TINY, jax.random.key(3), dtype, scale=0.3)
    state = init_editor(ecfg, TINY, jax.random.key(4))
    # Perturb the zero-initialised parts so every parameter has a gradient path.
    nets = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape, a.dtype),
                        state.nets)
    nets = jax.tree.map(lambda a: a.astype(dtype), nets)
    def scaled(net):
        blocks = tuple(dict(blk, A=blk["A"] * 0.3) for blk in net["blocks"])
        return dict(net, blocks=blocks, lr=jnp.full_like(net["lr"], 0.5))

    nets = {k: tuple(scaled(net) for net in sets) for k, sets in nets.items()}
    # Huge prior counts make the normaliser's statistics constant to ~1e-10, so finite
    # differences see the same function the (stop-gradient) normaliser differentiates.
    stats = jax.tree.map(lambda s: s.astype(dtype), state.stats)
    stats = {k: normalizer.Stats(jnp.full_like(s.count, 1e12), jnp.zeros_like(s.mean), jnp.full_like(s.m2, 1e12))
             for k, s in stats.items()}
    return params, EditorState(nets, stats, state.key_gram)


# Jitted entry points: one compile each, instead of many eager dispatches.
_edit = jax.jit(multi_step_edit, static_argnums=(0, 1), static_argnames=("n_answer",))
_capture = jax.jit(capture, static_argnums=(0, 3), static_argnames=("n_answer", "key_positions"))


def _meta_loss(ecfg, params, state, edit, gen):
    dtype = params["norm"]["weight"].dtype
    deltas, _, _ = multi_step_edit(ecfg, TINY, params, state, edit, zero_deltas(ecfg, TINY, dtype), n_answer=2)
    return edited_loss(TINY, params, gen, deltas, n_answer=2) + 0.1 * sum(jnp.sum(d * d) for d in deltas.values())


@functools.cache
def _loss_fns(ecfg):
    """The jitted meta-loss of the editor nets and its gradient: compiled once per config
    and shared by the tests (f(nets, params, stats, edit, gen))."""
    def f(nets, params, stats, edit, gen):
        return _meta_loss(ecfg, params, EditorState(nets, stats), edit, gen)
    return jax.jit(f), jax.jit(jax.grad(f))


def _directional_fd(f, x, v, eps=1e-7):
    plus = jax.tree.map(lambda a, b: a + eps * b, x, v)
    minus = jax.tree.map(lambda a, b: a - eps * b, x, v)
    return (f(plus) - f(minus)) / (2 * eps)


def _dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("step_specific", [True, False])
def test_msbp_exact_gradient_matches_finite_differences(step_specific):
    with jax.enable_x64(True):
        ecfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=4, n_blocks=2, steps=2, msbp="exact", step_specific=step_specific)
        params, state = _setup(ecfg, jnp.float64)
        edit, gen = tiny_batch(0), tiny_batch(1)
        loss, loss_grad = _loss_fns(ecfg)
        grad = loss_grad(state.nets, params, state.stats, edit, gen)
        f = lambda nets: loss(nets, params, state.stats, edit, gen)  # noqa: E731
        for seed in range(3):
            v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(seed + a.ndim), a.shape, a.dtype), state.nets)
            fd = _directional_fd(f, state.nets, v)
            np.testing.assert_allclose(float(_dot(grad, v)), float(fd), rtol=1e-6)


def test_msbp_detached_gradient_matches_finite_differences_of_frozen_captures():
    """Detached MSBP differentiates the edit with every step's keys and value gradients
    held at their current values: check against finite differences of exactly that."""
    with jax.enable_x64(True):
        ecfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=4, n_blocks=2, steps=2, msbp="detached")
        params, state = _setup(ecfg, jnp.float64)
        edit, gen = tiny_batch(0), tiny_batch(1)
        # Record the captures of each step at the current editor parameters.
        caps, deltas = [], zero_deltas(ecfg, TINY, jnp.float64)
        run_capture = jax.jit(lambda d: capture(TINY, params, edit, MODULES, d, n_answer=2))
        run_update = jax.jit(step_update, static_argnums=(0, 1))
        bounds = update_bounds(ecfg, TINY, params)         # the default trust region (EditorConfig.max_update)
        assert bounds
        for t in range(2):
            cap = run_capture(deltas)
            caps.append(cap)
            nets_t = {k: sets[t] for k, sets in state.nets.items()}
            stats_t = jax.tree.map(lambda a: a[t], state.stats)
            dws, _ = run_update(ecfg, TINY, nets_t, stats_t, cap, bounds=bounds)
            deltas = {m: deltas[m] + dws[m] for m in deltas}

        def frozen(nets):
            total = zero_deltas(ecfg, TINY, jnp.float64)
            for t in range(2):
                dws, _ = step_update(ecfg, TINY, {k: sets[t] for k, sets in nets.items()},
                                     jax.tree.map(lambda a: a[t], state.stats), caps[t], bounds=bounds)
                total = {m: total[m] + dws[m] for m in total}
            return edited_loss(TINY, params, gen, total, n_answer=2) + 0.1 * sum(jnp.sum(d * d) for d in total.values())

        loss, loss_grad = _loss_fns(ecfg)
        frozen = jax.jit(frozen)
        np.testing.assert_allclose(float(loss(state.nets, params, state.stats, edit, gen)), float(frozen(state.nets)),
                                   rtol=1e-12)
        grad = loss_grad(state.nets, params, state.stats, edit, gen)
        for seed in range(3):
            v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(seed + a.ndim), a.shape, a.dtype), state.nets)
            np.testing.assert_allclose(float(_dot(grad, v)), float(_directional_fd(frozen, state.nets, v)), rtol=1e-6)
        # Exact MSBP differs: it also sees how step 2's captures depend on step 1.
        exact = _loss_fns(EditorConfig(**{**ecfg.__dict__, "msbp": "exact"}))[1](state.nets, params, state.stats,
                                                                                 edit, gen)
        diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(exact)))
        assert diff > 1e-8


def test_slot_chunked_update_equals_whole_batch_in_value_and_gradient():
    """step_update with `slot_chunk` (the hypernetwork and the ridge solve's sums UᵀU and
    UᵀD taken a few slots at a time, as a batch of thousands of edits is edited) against
    the whole-batch update, float64: with the key-memory prior and without it (the whole
    batch then takes the dual form), masked slots and a last chunk of padding; and the
    gradient with respect to the hypernetworks."""
    import dataclasses
    with jax.enable_x64(True):
        ecfg = EditorConfig(key_memory=1.0, loc_prior=0.0, modules=MODULES, rank=4, n_blocks=2, steps=1,
                            max_update=0.0)
        params, state = _setup(ecfg, jnp.float64)
        cap = jax.jit(lambda: capture(TINY, params, tiny_batch(0), MODULES, n_answer=3))()   # 9 slots, 3 masked
        assert not bool(cap.mask.all())
        nets = {k: sets[0] for k, sets in state.nets.items()}
        stats = jax.tree.map(lambda a: a[0], state.stats)
        rng = np.random.default_rng(0)
        grams = {}
        for key, g in state.key_gram.items():
            a = rng.normal(size=g.shape)
            grams[key] = jnp.asarray(a @ a.swapaxes(1, 2) / g.shape[-1])
        weights = {m: jnp.asarray(rng.normal(size=get_kernel(TINY, params, m).shape)) for m in MODULES}
        for key_gram in (grams, None):
            cfg = ecfg if key_gram else dataclasses.replace(ecfg, key_memory=0.0)

            def loss(nets, slot_chunk):
                dws, _ = step_update(cfg, TINY, nets, stats, cap, key_gram, slot_chunk=slot_chunk)
                return sum(jnp.sum(weights[m] * dws[m]) for m in MODULES), dws

            value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
            whole, chunked = value_and_grad(nets, None), value_and_grad(nets, 4)
            chex.assert_trees_all_close(chunked, whole, rtol=1e-9, atol=1e-12)
            assert all(float(jnp.abs(dw).max()) > 1e-6 for dw in whole[0][1].values())


def test_step_ranks_keep_each_step_at_its_rank():
    ecfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=8, n_blocks=2, steps=3)
    assert ecfg.step_ranks() == (8, 4, 2)
    assert EditorConfig(key_memory=0.0, modules=MODULES, rank=8, steps=3, step_specific=False).step_ranks() == (8,)
    # Every kernel shape has one parameter set per step, each at its step's rank.
    state = init_editor(ecfg, TINY, jax.random.key(0))
    for sets in state.nets.values():
        assert [(blk["A"].shape[1], blk["B"].shape[0]) for net in sets for blk in net["blocks"]] == \
            [(r, r) for r in (8, 4, 2) for _ in range(2)]
    # In the T-step edit, step t runs parameter set t: changing set 1 leaves step 0's
    # update unchanged and changes step 1's.
    ecfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=4, n_blocks=1, steps=2)
    params, state = _setup(ecfg, jnp.float32)
    edit = jax.jit(lambda nets: multi_step_edit(ecfg, TINY, params, state._replace(nets=nets), tiny_batch(0),
                                                zero_deltas(ecfg, TINY), n_answer=2)[2])
    base = edit(state.nets)
    moved = edit({k: (sets[0], jax.tree.map(lambda a: a * 1.5, sets[1])) for k, sets in state.nets.items()})
    chex.assert_trees_all_equal({m: moved[m][0] for m in MODULES}, {m: base[m][0] for m in MODULES})
    assert max(float(jnp.abs(moved[m][1] - base[m][1]).max()) for m in MODULES) > 1e-6


def test_rollback_and_apply_are_exact():
    ecfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=4, n_blocks=1, steps=2, lr_init=0.3)
    params, state = _setup(ecfg)
    original = jax.tree.map(lambda a: np.array(a), params)
    deltas, _, per_step = _edit(ecfg, TINY, params, state, tiny_batch(0), zero_deltas(ecfg, TINY), n_answer=2)
    assert all(float(jnp.abs(d).max()) > 0 for d in deltas.values())
    np.testing.assert_allclose(sum(per_step[m] for m in [MODULES[0]])[0] + per_step[MODULES[0]][1], deltas[MODULES[0]], rtol=1e-6)
    edited = apply_deltas(TINY, params, deltas)
    # The parameters passed in are untouched: rolling back is dropping the deltas.
    chex.assert_trees_all_equal(params, original)
    # Subtracting the deltas again restores the weights to within float32 rounding;
    # the delta representation itself (params + deltas) never loses a bit.
    back = apply_deltas(TINY, edited, {m: -d for m, d in deltas.items()})
    chex.assert_trees_all_close(back, original, atol=1e-6, rtol=1e-7)
    ids = tiny_batch(1)
    from emsedit_jax.editor.capture import edited_logits
    logits = jax.jit(edited_logits, static_argnums=0, static_argnames=("n_answer",))
    lg_edit, _, _ = logits(TINY, params, ids, deltas, n_answer=2)
    lg_applied, _, _ = logits(TINY, edited, ids, None, n_answer=2)
    np.testing.assert_allclose(lg_edit, lg_applied, atol=1e-5)


# ------------------------------------------------------------------ key memory (extension)
def test_ridge_with_key_memory_protects_earlier_keys():
    """dW = (U^T U + e^lam I + mu V^T V)^-1 U^T D: mu = 0 is the plain solve; as mu grows,
    the update stops moving the outputs at the earlier keys V, and still fits D at U."""
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
        u = jax.random.normal(k1, (6, 12), jnp.float64)
        d = jax.random.normal(k2, (6, 4), jnp.float64)
        v = jax.random.normal(k3, (5, 12), jnp.float64) + u[:1]    # shares a direction with u
        lam = jnp.asarray(-6.0, jnp.float64)
        np.testing.assert_allclose(solve.ridge(u, d, lam, jnp.zeros((12, 12), jnp.float64)), solve.ridge(u, d, lam),
                                   rtol=1e-10, atol=1e-12)
        moved = [float(jnp.linalg.norm(v @ solve.ridge(u, d, lam, mu * v.T @ v))) for mu in (0.0, 1.0, 1e4)]
        assert moved[0] > 10 * moved[1] > 100 * moved[2], moved
        fit = u @ solve.ridge(u, d, lam, 1e4 * v.T @ v)
        assert float(jnp.linalg.norm(fit - d)) < 0.02 * float(jnp.linalg.norm(d))   # 12 dims hold both


def test_key_memory_accumulates_the_streams_keys_and_shields_them():
    """Editing batch A then batch B: the memory after A is the Gram matrix of A's keys at
    its last step; with it, B's update moves the module outputs at A's keys less than the
    paper's solve does; a new stream starts from an empty memory."""
    plain = EditorConfig(key_memory=0.0, modules=MODULES, rank=4, n_blocks=1, steps=2, lr_init=0.5)
    cfg = EditorConfig(**{**plain.__dict__, "key_memory": 10.0})
    params, state = _setup(cfg)
    assert init_editor(plain, TINY, jax.random.key(0)).key_gram == {}
    a, b = tiny_batch(0), tiny_batch(1)
    deltas_a, state_a, per_step = _edit(cfg, TINY, params, state, a, zero_deltas(cfg, TINY), n_answer=2)
    last = _capture(TINY, params, a, MODULES, {m: per_step[m][0] for m in MODULES}, n_answer=2)
    for key, names in (("16x24", MODULES[:2]), ("24x16", MODULES[2:])):
        for i, m in enumerate(names):
            u = np.asarray(last.keys[m]).reshape(-1, last.keys[m].shape[-1]) * np.asarray(last.mask).reshape(-1, 1)
            np.testing.assert_allclose(state_a.key_gram[key][i], u.T @ u, rtol=1e-4, atol=1e-5)
    moved = {}
    for name, c in (("plain", plain), ("memory", cfg)):
        st = state_a if c.key_memory else EditorState(state_a.nets, state_a.stats, {})
        after, _, _ = _edit(c, TINY, params, st, b, deltas_a, n_answer=2)
        moved[name] = sum(float(jnp.linalg.norm(last.keys[m].reshape(-1, last.keys[m].shape[-1])
                                                @ (after[m] - deltas_a[m]))) for m in MODULES)
    assert moved["memory"] < 0.5 * moved["plain"], moved
    fresh = new_stream(cfg, TINY, state_a)
    assert all(float(jnp.abs(g).max()) == 0 for g in fresh.key_gram.values())
    assert fresh.nets is state_a.nets and fresh.stats is state_a.stats


def test_loc_prior_starts_the_memory_and_shields_the_prior_keys():
    """With loc_prior = nu a stream's key memory starts at (nu / mu) C0, and the edit then
    moves the module outputs at C0's keys less than from an empty memory (same compiled
    edit: only the starting memory differs)."""
    with pytest.raises(ValueError, match="needs key_memory"):
        EditorConfig(modules=MODULES, key_memory=0.0, loc_prior=1.0)
    cfg = EditorConfig(modules=MODULES, rank=4, n_blocks=1, steps=2, lr_init=0.5, key_memory=2.0, loc_prior=50.0)
    params, state = _setup(cfg)
    with pytest.raises(ValueError, match="preserved_gram"):
        new_stream(cfg, TINY, state)
    other = _capture(TINY, params, tiny_batch(2), MODULES, None, n_answer=2)     # "unrelated" prompts
    mask = np.asarray(other.mask).reshape(-1)
    keys = {m: np.asarray(other.keys[m]).reshape(mask.size, -1)[mask] for m in MODULES}
    c0 = {"16x24": jnp.stack([keys[m].T @ keys[m] / len(keys[m]) for m in MODULES[:2]]),
          "24x16": jnp.stack([keys[m].T @ keys[m] / len(keys[m]) for m in MODULES[2:]])}
    with pytest.raises(ValueError, match="do not match"):
        new_stream(cfg, TINY, state, {"16x24": c0["16x24"]})
    start = new_stream(cfg, TINY, state, c0)
    for key in c0:
        np.testing.assert_allclose(start.key_gram[key], 25.0 * c0[key], rtol=1e-6)
    empty = new_stream(cfg, TINY, state, jax.tree.map(jnp.zeros_like, c0))
    moved = {}
    for name, st in (("prior", start), ("empty", empty)):
        after, _, _ = _edit(cfg, TINY, params, st, tiny_batch(0), zero_deltas(cfg, TINY), n_answer=2)
        moved[name] = sum(float(np.linalg.norm(keys[m] @ np.asarray(after[m]))) for m in MODULES)
    assert moved["prior"] < 0.5 * moved["empty"], moved


def test_null_space_projection_leaves_the_protected_keys_outputs_unchanged():
    """With null_space = tau every step's update is P dW, P projecting out C0's
    eigenvectors above tau * the largest eigenvalue: after a two-step edit the edited
    modules' outputs k^T (W + dW) at C0's keys equal k^T W to 1e-5, while the edit
    still moves the outputs at its own keys; P itself is an orthogonal projection."""
    with pytest.raises(ValueError, match="null_space"):
        EditorConfig(key_memory=0.0, modules=MODULES, null_space=1.0)
    cfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=4, n_blocks=1, steps=2, lr_init=0.5, null_space=1e-4)
    params, state = _setup(cfg)
    with pytest.raises(ValueError, match="preserved_gram"):
        new_stream(cfg, TINY, state)
    other = _capture(TINY, params, tiny_batch(2), MODULES, None, n_answer=2)     # 6 protected keys per module
    mask = np.asarray(other.mask).reshape(-1)
    keys = {m: np.asarray(other.keys[m], np.float64).reshape(mask.size, -1)[mask] for m in MODULES}
    c0 = {"16x24": jnp.stack([keys[m].T @ keys[m] / len(keys[m]) for m in MODULES[:2]]),
          "24x16": jnp.stack([keys[m].T @ keys[m] / len(keys[m]) for m in MODULES[2:]])}
    start = new_stream(cfg, TINY, state, c0)
    assert start.key_gram == {}
    for key, p in start.protect.items():
        p = np.asarray(p, np.float64)
        np.testing.assert_allclose(p @ p, p, atol=1e-5)
        np.testing.assert_allclose(p, np.swapaxes(p, 1, 2), atol=1e-6)
        assert np.all(np.trace(p, axis1=1, axis2=2) > 0.5 * p.shape[-1] - 6.5)   # at most 6 directions removed
    edit = tiny_batch(0)
    after, _, _ = _edit(cfg, TINY, params, start, edit, zero_deltas(cfg, TINY), n_answer=2)
    own = _capture(TINY, params, edit, MODULES, None, n_answer=2)
    for m in MODULES:
        dw = np.asarray(after[m], np.float64)
        w = np.asarray(module_kernel(params, m), np.float64)
        assert np.abs(keys[m] @ dw).max() <= 1e-5 * max(1.0, np.abs(keys[m] @ w).max()), m
        u = np.asarray(own.keys[m], np.float64).reshape(-1, dw.shape[0])
        assert np.abs(u @ dw).max() > 1e-3, m          # the edit itself still moves its own outputs


def module_kernel(params, name):
    """The (d_in, d_out) kernel of module `name` of the tiny model."""
    from emsedit_jax.models.transformer import parse_module
    layer, suffix = parse_module(TINY, name)
    node = params["layers"]
    for part in suffix.split("."):
        node = node[part]
    return node["kernel"][layer]


def test_subject_key_slots_feed_the_edit_and_the_key_memory():
    """key_positions="both": a step's keys are the module inputs at the marked subject
    token and at the answer slots (2 A slots per row), the value gradients there are
    the loss's gradients (nonzero at the subject token, which precedes the answer), and
    the key memory accumulates exactly those keys."""
    cfg = EditorConfig(modules=MODULES[:1], rank=4, n_blocks=1, steps=1, lr_init=0.5, key_memory=1.0, loc_prior=0.0,
                       key_positions="both")
    params, state = _setup(cfg)
    batch = tiny_batch(0)
    subject = np.zeros(batch.labels.shape, np.int32)
    subject[:, 1] = 1                                           # before every row's answer slots
    batch = batch._replace(subject=jnp.asarray(subject))
    cap = _capture(TINY, params, batch, MODULES[:1], None, n_answer=2, key_positions="both")
    answer = _capture(TINY, params, batch, MODULES[:1], None, n_answer=2)
    m = MODULES[0]
    assert cap.keys[m].shape[1] == 4 and np.asarray(cap.mask).sum(axis=1).tolist() == [3, 3, 3]
    np.testing.assert_allclose(cap.keys[m][:, 1:3], answer.keys[m], rtol=1e-6)       # slots: 1, answer, answer
    np.testing.assert_allclose(cap.grads[m][:, 1:3], answer.grads[m], rtol=1e-5, atol=1e-8)
    assert float(jnp.abs(cap.grads[m][:, 0]).min(axis=-1).max()) > 0
    _, after, _ = _edit(cfg, TINY, params, new_stream(cfg, TINY, state), batch, zero_deltas(cfg, TINY), n_answer=2)
    u = np.asarray(cap.keys[m]).reshape(-1, 16) * np.asarray(cap.mask).reshape(-1, 1)
    np.testing.assert_allclose(after.key_gram["16x24"][0], u.T @ u, rtol=1e-4, atol=1e-5)


def test_trust_region_caps_each_steps_update_at_rho_times_the_weights_norm():
    """max_update = rho: a step's update of module m is scaled down to norm rho ||W_m||
    where it is longer, and left alone where it is shorter; a huge rho is no cap at all."""
    free_cfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=4, n_blocks=2, steps=2, max_update=0.0)
    params, state = _setup(free_cfg)
    edit = tiny_batch(0)
    zero = zero_deltas(free_cfg, TINY)
    _, _, free = _edit(free_cfg, TINY, params, state, edit, zero, n_answer=2)
    w_norm = {m: float(jnp.linalg.norm(get_kernel(TINY, params, m))) for m in MODULES}
    free_norm = {m: np.linalg.norm(np.asarray(free[m]).reshape(2, -1), axis=1) for m in MODULES}
    ratios = np.concatenate([free_norm[m] / w_norm[m] for m in MODULES])
    rho = float(np.median(ratios))                       # binds on about half of the updates
    assert ratios.min() < rho < ratios.max()
    capped_cfg = EditorConfig(**{**free_cfg.__dict__, "max_update": rho})
    _, _, capped = _edit(capped_cfg, TINY, params, state, edit, zero, n_answer=2)
    for m in MODULES:
        bound = rho * w_norm[m]
        # The first step sees the same capture either way: its update is the free one, scaled.
        np.testing.assert_allclose(capped[m][0], free[m][0] * min(1.0, bound / free_norm[m][0]), rtol=1e-5,
                                   atol=1e-7)
        assert np.all(np.linalg.norm(np.asarray(capped[m]).reshape(2, -1), axis=1) <= bound * (1 + 1e-5))
    loose_cfg = EditorConfig(**{**free_cfg.__dict__, "max_update": 1e6})
    _, _, loose = _edit(loose_cfg, TINY, params, state, edit, zero, n_answer=2)
    for m in MODULES:
        np.testing.assert_array_equal(loose[m], free[m])
