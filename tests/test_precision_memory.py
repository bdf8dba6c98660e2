"""Mixed precision and memory on the tiny model: a bfloat16 LLM is edited with float32
deltas, statistics and losses, close to the float32 run; the chunked capture equals the
whole-batch capture (values and MSBP gradients); remat + chunking leave the edit step's
result unchanged; the edit step of many requests holds no per-request weight copy and
solves the ridge problem in its primal (d_in x d_in) form. (Empty padding rows are
checked in tests/test_sharding.py, whose meshes pad 3 rows to 4.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_requests

from emsedit_jax.editor.capture import (
    IGNORE,
    Batch,
    capture,
    edited_logits,
    pad_rows,
    prefix_hidden,
    token_nll,
)
from emsedit_jax.editor.config import EditorConfig
from emsedit_jax.editor.steps import init_editor, zero_deltas
from emsedit_jax.evaluate import edit_batch
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split
from emsedit_jax.train import TrainConfig, make_optimizer, train_step

MODULES = ("model.layers.2.mlp.up_proj", "model.layers.3.mlp.up_proj")


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return load_model(tiny_model_dir), load_model(tiny_model_dir, dtype=jnp.bfloat16, tokenizer=False)


def ecfg(**kw):
    return EditorConfig(modules=MODULES, rank=8, n_blocks=1, lr_init=0.1, **{"key_memory": 0.0, **kw})


def batch_of(model, n, seed, max_row_len=512):
    split = encode_split(model.tokenizer, synthetic_requests(n, seed=seed))
    rows = np.arange(n)
    layout = split.layout([rows], max_row_len)
    return split.batch(rows, layout), layout


@pytest.fixture(scope="module")
def plain_edit(models):
    """A float32 edit of 16 requests in 3+ packed rows: (batch, layout, state, result)."""
    m32, _ = models
    batch, layout = batch_of(m32, 16, seed=1, max_row_len=16)
    assert batch.edit.input_ids.shape[0] >= 3
    state = init_editor(ecfg(), m32.config, jax.random.key(0))
    result = edit_batch(state, m32.params, batch.edit, zero_deltas(ecfg(), m32.config), ecfg=ecfg(),
                        lcfg=m32.config, n_answer=layout.edit.n_answer)
    return batch, layout, state, result


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _close_trees(a, b, rtol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                   atol=rtol * float(np.abs(np.asarray(y)).max() + 1e-30))


def test_bf16_model_keeps_editor_and_losses_in_f32(models, plain_edit):
    m32, m16 = models
    batch, layout, state, (d32, s32) = plain_edit
    assert jax.tree.leaves(m16.params)[0].dtype == jnp.bfloat16
    cfg = ecfg()
    d16, s16 = edit_batch(state, m16.params, batch.edit, zero_deltas(cfg, m16.config), ecfg=cfg, lcfg=m16.config,
                          n_answer=layout.edit.n_answer)
    assert {d.dtype for d in d16.values()} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(s16)} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((d16, s16)))
    for m in MODULES:
        assert float(jnp.linalg.norm(d32[m])) > 0
        assert rel(d16[m], d32[m]) < 0.1, m
    assert rel(s16.stats["32x64"].mean, s32.stats["32x64"].mean) < 0.1

    # Logits and losses in float32, close to the float32 model's.
    losses = {}
    for name, m, d in (("f32", m32, d32), ("bf16", m16, d16)):
        logits, targets, mask = edited_logits(m.config, m.params, batch.gen, d, n_answer=layout.rephrase.n_answer)
        assert logits.dtype == jnp.float32, name
        losses[name] = float(token_nll(logits, targets, mask))
    assert np.isfinite(losses["bf16"]) and abs(losses["bf16"] - losses["f32"]) < 0.05 * losses["f32"], losses
    # The meta-training step on the bfloat16 model: float32 hypernetworks, state and metrics.
    tx = make_optimizer(TrainConfig(meta_lr=1e-3))
    out = jax.eval_shape(functools.partial(train_step, ecfg=cfg, lcfg=m16.config, tx=tx, n_answer=layout.n_answer),
                         state.nets, state.stats, tx.init(state.nets), m16.params, batch, zero_deltas(cfg, m16.config))
    nets, stats, _, deltas, metrics, _ = out    # (the optimiser state holds an int32 step count)
    assert {x.dtype for x in jax.tree.leaves((nets, stats, deltas, metrics))} == {jnp.dtype(jnp.float32)}


def test_remat_and_chunked_edit_step_match_plain(models, plain_edit):
    m32, _ = models
    batch, layout, state, result = plain_edit
    cfg = ecfg()
    out = edit_batch(state, m32.params, batch.edit, zero_deltas(cfg, m32.config), ecfg=cfg, lcfg=m32.config,
                     n_answer=layout.edit.n_answer, remat=True, chunk=2)
    _close_trees(out, result)


def test_chunked_capture_equals_whole_batch(models, plain_edit):
    m32, _ = models
    lcfg = m32.config
    batch, layout, _, _ = plain_edit
    edit = batch.edit
    b = edit.input_ids.shape[0]
    deltas = {m: 0.05 * jax.random.normal(jax.random.key(i), d.shape) for i, (m, d) in
              enumerate(zero_deltas(ecfg(), lcfg).items())}

    def probe(deltas, chunk):
        """A scalar of everything the capture returns, so that its gradient is what exact
        MSBP differentiates: the keys and value gradients w.r.t. earlier steps' deltas."""
        cap = capture(lcfg, m32.params, edit, MODULES, deltas, n_answer=layout.edit.n_answer, chunk=chunk,
                      prefix=prefix_hidden(lcfg, m32.params, edit, 2))
        value = cap.loss + sum(jnp.sum(jnp.sin(k)) + jnp.sum(jnp.sin(100 * g))
                               for k, g in zip(cap.keys.values(), cap.grads.values()))
        return value, cap

    run = jax.jit(jax.value_and_grad(probe, has_aux=True), static_argnums=1)
    (_, whole), g_whole = run(deltas, None)
    assert float(jnp.abs(whole.grads[MODULES[0]]).max()) > 0 and float(jnp.abs(g_whole[MODULES[0]]).max()) > 0
    # b - 1 rows per microbatch: two microbatches, the second padded with empty rows.
    (_, parts), g_parts = run(deltas, b - 1)
    assert parts.keys[MODULES[0]].shape == whole.keys[MODULES[0]].shape
    _close_trees(parts, whole)
    _close_trees(g_parts, g_whole, rtol=1e-4)


def _avals(jaxpr):
    """Every intermediate value's abstract shape in a jaxpr and its sub-jaxprs."""
    from jax.extend import core as jcore
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _avals(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _avals(sub)


def test_many_requests_no_weight_copies_and_primal_ridge(models):
    m32, _ = models
    lcfg = m32.config
    n_requests = 128
    batch, layout = batch_of(m32, n_requests, seed=5, max_row_len=64)
    cfg = ecfg()
    n_slots = layout.edit.n_rows * layout.edit.n_answer          # answer positions the solve sees
    d_in, d_out = 32, 64
    assert n_slots > d_in
    state = init_editor(cfg, lcfg, jax.random.key(0))
    fn = functools.partial(edit_batch, ecfg=cfg, lcfg=lcfg, n_answer=layout.edit.n_answer)
    jaxpr = jax.make_jaxpr(fn)(state, m32.params, batch.edit, zero_deltas(cfg, lcfg)).jaxpr
    shapes = [tuple(a.shape) for a in _avals(jaxpr) if hasattr(a, "shape")]
    largest = max(shapes, key=lambda s: int(np.prod(s)))
    # Nothing of n_requests x (a weight's size): the deltas are one matrix per module.
    assert int(np.prod(largest)) < n_requests * d_in * d_out, largest
    # Primal ridge: Gram matrices are d_in x d_in, never (answer positions)^2.
    assert not any(s[-2:] == (n_slots, n_slots) for s in shapes if len(s) >= 2)
    assert (d_in, d_in) in shapes


def test_pad_rows_rejects_shrinking():
    b = Batch(jnp.zeros((3, 4), jnp.int32), jnp.ones((3, 4), jnp.int32), jnp.full((3, 4), IGNORE, jnp.int32))
    with pytest.raises(ValueError, match="cannot pad"):
        pad_rows(b, 2)
    assert pad_rows(b, 3) is b
    p = pad_rows(b, 5)
    assert p.input_ids.shape == (5, 4) and int(p.attention_mask[3:].sum()) == 0
    assert bool((p.labels[3:] == IGNORE).all()) and p.positions is None


def test_float32_residual_stream_keeps_matmuls_in_bf16(tiny_model_dir, models, plain_edit):
    """Mixed precision with a float32 residual stream: bfloat16 parameters and matmuls,
    the running sum of the layers' outputs in float32; closer to the float32 model."""
    from emsedit_jax.flops import iter_eqns
    from emsedit_jax.models.transformer import embed, forward
    m32, m16 = models
    m16r = load_model(tiny_model_dir, dtype=jnp.bfloat16, residual="float32", tokenizer=False)
    assert m16r.config.residual_dtype == "float32" and m16.config.residual_dtype is None
    batch = plain_edit[0].edit
    args = (batch.input_ids, batch.attention_mask)
    pos = batch.positions
    assert embed(m16r.config, m16r.params, batch.input_ids, pos).dtype == jnp.float32
    assert embed(m16.config, m16.params, batch.input_ids, pos).dtype == jnp.bfloat16
    jaxpr = jax.make_jaxpr(lambda p: forward(m16r.config, p, *args, positions=pos)[0])(m16r.params)
    dots = [e for e in iter_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) > 5 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    mask = np.asarray(batch.attention_mask) > 0
    ref = np.asarray(forward(m32.config, m32.params, *args, positions=pos)[0])[mask]
    err = {name: rel(np.asarray(forward(m.config, m.params, *args, positions=pos)[0])[mask], ref)
           for name, m in (("bf16", m16), ("bf16 + f32 residual", m16r))}
    assert err["bf16 + f32 residual"] < err["bf16"], err


@pytest.mark.parametrize("spec, shapes", [("...i,io->...o", ((2, 5, 12), (12, 7))),       # a linear module
                                          ("...d,vd->...v", ((2, 5, 12), (9, 12))),       # a tied LM head
                                          ("bkmd,bktd->bkmt", ((2, 3, 8, 4), (2, 3, 5, 4))),   # attention scores
                                          ("bkmt,bktd->bkmd", ((2, 3, 8, 5), (2, 3, 5, 4)))])  # attention output
def test_low_precision_einsum_sums_in_float32_forward_and_backward(spec, shapes):
    """bfloat16 operands, float32 sums: the product and both operand gradients equal
    float64 einsums of the same (bfloat16) values to bfloat16 rounding of the result,
    and every matmul of the forward and backward pass is bfloat16 x bfloat16 summed in
    float32 (XLA on CPU runs those on the bfloat16 units; with a bfloat16 result it
    computes in float32, several times slower)."""
    from emsedit_jax.flops import iter_eqns
    from emsedit_jax.models.layers import low_precision_einsum
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in shapes)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), a, b).shape
    g = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    for out_dtype in (jnp.float32, jnp.bfloat16):
        y, vjp = jax.vjp(lambda a, b: low_precision_einsum(spec, a, b, out_dtype), a, b)
        assert y.dtype == out_dtype
        da, db = vjp(g.astype(out_dtype))
        a64, b64 = (np.asarray(x, np.float64) for x in (a, b))
        g64 = np.asarray(g.astype(out_dtype).astype(jnp.bfloat16), np.float64)
        ins, out = spec.replace("...", "yz").split("->")      # numpy sums no "..." away: the two batch axes
        sa, sb = ins.split(",")
        refs = (np.einsum(f"{sa},{sb}->{out}", a64, b64), np.einsum(f"{out},{sb}->{sa}", g64, b64),
                np.einsum(f"{sa},{out}->{sb}", a64, g64))
        for got, ref in zip((y, da, db), refs):
            assert got.shape == ref.shape
            np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
        jaxpr = jax.make_jaxpr(lambda a, b: jax.vjp(lambda a, b: low_precision_einsum(spec, a, b, out_dtype), a, b)[1](
            g.astype(out_dtype)))(a, b)
        dots = [e for e in iter_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
        assert len(dots) == 3          # the product and its two transposes
        assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
        assert all(e.params["preferred_element_type"] == jnp.float32 for e in dots)


def test_bf16_model_capture_has_no_bfloat16_result_matmul(tiny_model_dir, plain_edit):
    """The capture of a bfloat16 model with a float32 residual stream (forward, backward
    to the edited modules, deltas applied): every matmul with bfloat16 operands sums in
    float32; the float32 deltas' own products stay float32."""
    from emsedit_jax.flops import iter_eqns
    m16r = load_model(tiny_model_dir, dtype=jnp.bfloat16, residual="float32", tokenizer=False)
    cfg = ecfg()
    batch, layout = plain_edit[:2]
    deltas = {k: v + 1e-3 for k, v in zero_deltas(cfg, m16r.config).items()}
    jaxpr = jax.make_jaxpr(lambda p, d: capture(m16r.config, p, batch.edit, cfg.modules, d,
                                                n_answer=layout.edit.n_answer))(m16r.params, deltas)
    dots = [e for e in iter_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    low = [e for e in dots if any(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert len(low) > 10 and all(e.params["preferred_element_type"] == jnp.float32 for e in low)
    assert all(v.aval.dtype == jnp.bfloat16 for e in low for v in e.invars)
    f32 = [e for e in dots if e not in low]
    assert f32 and all(v.aval.dtype == jnp.float32 for e in f32 for v in e.invars)
