"""MEND, MALMEN and RLEdit in the editor framework: each update rule against its formula
computed by hand, RLEdit's memory backtracking (weights, buffer, loss, training and
resume), the KL regulariser, and "Method²" as a pure configuration change."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_requests
from test_editor import TINY, tiny_batch  # the same tiny config and batches as the editor tests

from emsedit_jax import cli
from emsedit_jax.editor import memory as mem
from emsedit_jax.editor.capture import Batch, Capture, edited_loss
from emsedit_jax.editor.config import EditorConfig, method_config, parse_method
from emsedit_jax.editor.hypernet import init_net
from emsedit_jax.editor.losses import kl_locality
from emsedit_jax.editor.normalizer import Stats
from emsedit_jax.editor.objective import EditBatch
from emsedit_jax.editor.steps import (
    init_editor,
    multi_step_edit,
    step_update,
    zero_deltas,
)
from emsedit_jax.flops import iter_eqns
from emsedit_jax.models import ModelConfig, load_model
from emsedit_jax.models.layers import set_path
from emsedit_jax.models.transformer import init_params, tensor_specs, unstack_layers
from emsedit_jax.pipeline import encode_split
from emsedit_jax.train import TrainConfig, batch_plan, configs, make_optimizer, train, train_step

# Two modules share the 16x24 hypernetwork (per-layer eta and lambda); one has its own (24x16).
MODULES = ("model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj")


def tiny_params(seed=3, scale=0.3):
    """Random TINY parameters drawn with numpy (init_params' eager random draws compile
    one XLA program per shape, which dominates a small test)."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, spec in sorted(tensor_specs(TINY).items()):
        shape = ((TINY.num_layers,) if spec.stacked else ()) + spec.shape
        value = {"ones": np.ones(shape), "zeros": np.zeros(shape)}.get(spec.init)
        set_path(params, path, jnp.asarray(scale * rng.normal(size=shape) if value is None else value, jnp.float32))
    return params


def tiny_state(ecfg, seed=4, perturb=0.0):
    """init_editor's state, compiled once per configuration; `perturb` adds noise so the
    zero-initialised parts (B, b, shift) are nonzero too."""
    state = jax.jit(init_editor, static_argnums=(0, 1))(ecfg, TINY, jax.random.key(seed))
    if perturb:
        rng = np.random.default_rng(seed)
        nets = jax.tree.map(lambda a: a + perturb * jnp.asarray(rng.normal(size=a.shape), a.dtype), state.nets)
        state = state._replace(nets=nets)
    return state


# ------------------------------------------------------------------ update rules by hand
def _hand_problem(method, seed=0, b=5, a=4):
    """A capture of b*a answer slots (some masked), an identity hypernetwork, per-layer
    eta and lambda, and normaliser statistics with a nonzero mean and std whose huge prior
    count makes this batch's merge negligible, so normalised = (x - mean) / std."""
    ecfg = method_config(method, MODULES, rank=4, n_blocks=2, norm_eps=0.0, log_step_size=False)   # eta as set
    rng = np.random.default_rng(seed)
    mask = rng.random((b, a)) > 0.25
    keys, grads = {}, {}
    for m in MODULES:
        d_in, d_out = (16, 24) if "up_proj" in m else (24, 16)
        keys[m] = rng.normal(size=(b, a, d_in)).astype(np.float32)
        grads[m] = rng.normal(size=(b, a, d_out)).astype(np.float32)
    cap = Capture(jnp.zeros(()), {m: jnp.asarray(v) for m, v in keys.items()},
                  {m: jnp.asarray(v) for m, v in grads.items()}, jnp.asarray(mask))
    etas = {"16x24": [0.3, 0.7], "24x16": [0.45]}
    lams = {"16x24": [0.5, -0.3], "24x16": [0.2]}
    nets, stats, moments = {}, {}, {}
    for key in ("16x24", "24x16"):
        d_in, d_out = map(int, key.split("x"))
        nets[key] = init_net(jax.random.key(seed), d_in, d_out, len(etas[key]), 4, 2, 0.0, 0.0)   # B = 0: identity
        nets[key]["lr"] = jnp.asarray(etas[key], jnp.float32)
        nets[key]["lamda"] = jnp.asarray(lams[key], jnp.float32)
        dim = d_in + d_out
        mean, std = rng.normal(size=dim) * 0.5, rng.uniform(0.5, 2.0, size=dim)
        count = 1e12
        stats[key] = Stats(jnp.asarray(count, jnp.float32), jnp.asarray(mean, jnp.float32),
                           jnp.asarray(std ** 2 * (count - 1), jnp.float32))
        moments[key] = (mean, std)
    per_module = {}
    for key, names in (("16x24", MODULES[:2]), ("24x16", MODULES[2:])):
        for k, m in enumerate(names):
            d_in = keys[m].shape[-1]
            mean, std = moments[key]
            u = keys[m].reshape(-1, d_in).astype(np.float64)[mask.reshape(-1)]
            g = grads[m].reshape(-1, grads[m].shape[-1]).astype(np.float64)[mask.reshape(-1)]
            u_t = (u - mean[:d_in]) / std[:d_in]
            g_t = (g - mean[d_in:]) / std[d_in:]
            per_module[m] = {"u": u, "g": g, "u_t": u_t, "g_t": g_t, "eta": etas[key][k], "lam": lams[key][k]}
    return ecfg, nets, stats, cap, per_module


def test_mend_update_is_the_scaled_rank1_sum():
    ecfg, nets, stats, cap, hand = _hand_problem("mend")
    assert ecfg.update_rule == "rank1" and ecfg.steps == 1
    dws, _ = jax.jit(step_update, static_argnums=(0, 1))(ecfg, TINY, nets, stats, cap)
    for m, h in hand.items():
        # dW = sum_i u~_i (-eta g~_i)^T over the unmasked slots.
        expected = sum(np.outer(u, -h["eta"] * g) for u, g in zip(h["u_t"], h["g_t"]))
        np.testing.assert_allclose(np.asarray(dws[m]), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["malmen", "rledit"])
def test_ridge_update_matches_float64_normal_equations(method):
    ecfg, nets, stats, cap, hand = _hand_problem(method)
    assert ecfg.update_rule == "ridge"
    dws, _ = jax.jit(step_update, static_argnums=(0, 1))(ecfg, TINY, nets, stats, cap)
    for m, h in hand.items():
        u = h["u"]
        # c_i = -eta <u_i, u~_i>, d_i = c_i g~_i, dW = (U^T U + e^lambda I)^-1 U^T D.
        d = (-h["eta"] * np.sum(u * h["u_t"], axis=1))[:, None] * h["g_t"]
        expected = np.linalg.solve(u.T @ u + np.exp(h["lam"]) * np.eye(u.shape[1]), u.T @ d)
        # A float32 solve errs relative to the solution's scale (entries up to about 15
        # here), so small entries get an absolute tolerance of 1e-5 of the largest: the
        # rounding of one processor's kernels differs from another's by that much.
        np.testing.assert_allclose(np.asarray(dws[m]), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # 20 slots: >= d_in of the 16x24 group (primal form), < d_in of the 24x16 one (dual form).
    assert 16 <= cap.mask.size < 24 and not bool(cap.mask.all())


# ------------------------------------------------------------------ RLEdit's memory
def test_memory_weights_are_powers_of_time_decay():
    w = mem.memory_weights(3, slots=9, time_decay=0.95)
    np.testing.assert_allclose(w, [0.95, 0.95 ** 2, 0.95 ** 3, 0, 0, 0, 0, 0, 0], rtol=1e-7)
    np.testing.assert_array_equal(mem.memory_weights(0, 9, 0.95), np.zeros(9))
    # A long stream fills all back_depth - 1 slots; the batch of age back_depth has none.
    full = mem.memory_weights(50, 9, 0.95)
    np.testing.assert_allclose(full, 0.95 ** np.arange(1, 10), rtol=1e-7)
    assert method_config("rledit", MODULES).memory_slots == 9
    assert method_config("rledit", MODULES, back_depth=4).memory_slots == 3
    assert all(method_config(m, MODULES).memory_slots == 0 for m in ("emsedit", "mend", "malmen"))
    assert method_config("emsedit", MODULES, back_depth=3).memory_slots == 2
    assert EditorConfig(modules=MODULES, method="rledit").memory_slots == 9     # not only through method_config


def _fake_batch(value, rows=2, s=5):
    views = [Batch(*(jnp.full((rows, s), value + 10 * v + k, jnp.int32) for k in range(4))) for v in range(3)]
    return EditBatch(*views)


def test_memory_push_ages_entries_and_drops_the_oldest():
    memory = mem.empty_memory(_fake_batch(0), slots=3)
    assert memory.gen.input_ids.shape == (3, 2, 5) and not np.any(np.asarray(memory.weights))
    for n, value in enumerate([100, 200, 300, 400]):
        memory = mem.push(memory, _fake_batch(value), n, 0.5)
    # Most recent first: 400, 300, 200 (100 has aged out), all slots weighted.
    np.testing.assert_array_equal(np.asarray(memory.gen.input_ids[:, 0, 0]), [410, 310, 210])
    np.testing.assert_array_equal(np.asarray(memory.loc.labels[:, 0, 0]), [422, 322, 222])
    np.testing.assert_allclose(np.asarray(memory.weights), [0.5, 0.25, 0.125])


def test_kl_term_is_zero_for_a_zero_edit():
    ecfg = method_config("malmen", MODULES)
    params = tiny_params()
    batch = tiny_batch(5)
    kl = jax.jit(lambda deltas: kl_locality(TINY, params, batch, deltas, n_answer=2))
    zero = zero_deltas(ecfg, TINY)
    assert abs(float(kl(zero))) < 1e-7
    # ...and positive once the weights move (the test can fail).
    rng = np.random.default_rng(0)
    moved = {m: jnp.asarray(0.3 * rng.normal(size=d.shape), jnp.float32) for m, d in zero.items()}
    assert float(kl(moved)) > 1e-4


# ------------------------------------------------------------------ Method² = configuration
def test_method_squared_differs_by_configuration_alone():
    for name in ("mend", "malmen", "rledit"):
        base = method_config(name, MODULES)
        assert (base.steps, base.regulariser, base.method) == (1, "kl", name)
        two = method_config(name, MODULES, steps=2)
        assert two == dataclasses.replace(base, steps=2) == method_config(f"{name}2", MODULES)
    ems = method_config("emsedit", MODULES)
    assert (ems.steps, ems.regulariser) == (3, "norm")
    assert parse_method("rledit2") == ("rledit", 2) and parse_method("mend") == ("mend", None)
    with pytest.raises(ValueError):
        method_config("malmen2", MODULES, steps=3)
    with pytest.raises(ValueError):
        parse_method("rome")
    # The edit of steps=T gives T stacked updates: with one net for every step a scan of
    # length T, with a net per step a static unroll, no conditional on the step index
    # (traced, not run: test_editor checks the multi-step arithmetic).
    params = tiny_params()
    for steps, per_step_nets in ((1, True), (2, True), (2, False)):
        ecfg = method_config("malmen", MODULES[:1], steps=steps, rank=4, n_blocks=2, step_specific=per_step_nets)

        def edit(state, batch, ecfg=ecfg):
            return multi_step_edit(ecfg, TINY, params, state, batch, zero_deltas(ecfg, TINY), n_answer=2)

        state = jax.eval_shape(functools.partial(init_editor, ecfg, TINY), jax.random.key(0))
        _, _, per_step = jax.eval_shape(edit, state, tiny_batch(0))
        assert per_step[MODULES[0]].shape == (steps, 16, 24)
        jaxpr = jax.make_jaxpr(edit)(state, tiny_batch(0)).jaxpr
        assert "cond" not in {e.primitive.name for e in iter_eqns(jaxpr)}    # nested bodies included
        scans = [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert (steps in scans) == (steps == 1 or not per_step_nets)


def test_t_step_edit_traces_each_kind_of_layer_once(monkeypatch):
    """The layers run as one jitted function (transformer.layer), so tracing and
    differentiating a T-step edit traces the family's block once per kind of layer call
    (plain, edited), whatever the depth above the edited layer and the number of steps:
    before, every layer of every step's capture was traced again."""
    from emsedit_jax.models import llama
    block, shapes = llama.block, []

    def counted(cfg, lp, h, ctx, tap):
        shapes.append((h.shape, tuple(tap.edits)))
        return block(cfg, lp, h, ctx, tap)

    monkeypatch.setattr(llama, "block", counted)
    traced = {}
    for n_layers, steps in ((3, 1), (7, 3)):
        # A config no other test uses: nothing of it is in the jit caches yet.
        cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=53, hidden_size=16, intermediate_size=24,
                                       num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
                                       tie_word_embeddings=True, rms_norm_eps=1e-5 * (1 + n_layers)))
        ecfg = method_config("malmen", MODULES[:1], steps=steps, rank=4, n_blocks=2)
        params = unstack_layers(init_params(cfg, jax.random.key(0)))
        state = init_editor(ecfg, cfg, jax.random.key(1))

        def loss(nets, cfg=cfg, ecfg=ecfg, params=params, state=state):
            deltas, _, _ = multi_step_edit(ecfg, cfg, params, state._replace(nets=nets), tiny_batch(0),
                                           zero_deltas(ecfg, cfg), n_answer=2)
            return sum(jnp.sum(d ** 2) for d in deltas.values())

        shapes.clear()
        jax.make_jaxpr(jax.grad(loss))(state.nets)
        traced[n_layers, steps] = sorted(shapes)
    # One plain and one edited layer call each (layers 0 and 2..L-1 share the plain one).
    assert traced[3, 1] == traced[7, 3] == [((3, 7, 16), ()), ((3, 7, 16), ("mlp.up_proj",))], traced


def test_cli_train_resolves_method_defaults():
    parser = cli.build_parser()

    def resolved(*extra):
        args = parser.parse_args(["train", "--out", "x", *extra])
        return cli.train_editor_config(args, TINY)

    assert (resolved().method, resolved().steps, resolved().regulariser) == ("emsedit", 3, "norm")
    r = resolved("--method", "rledit")
    assert (r.steps, r.regulariser, r.step_specific) == (1, "kl", True)
    r2 = resolved("--method", "rledit", "--steps", "2", "--protocol", "batch")
    assert (r2.steps, r2.regulariser, r2.step_specific, r2.n_param_sets) == (2, "kl", False, 1)
    assert resolved("--method", "malmen", "--steps", "2").n_param_sets == 2
    # EMSEdit's default solve has the key memory and its locality prior; the baselines keep
    # their papers' solve, and --key-memory 0 is EMSEdit's (the prior goes with the memory).
    # The other extensions are off unless asked for (RLEdit keeps its own memory depth).
    assert (resolved().key_memory, resolved().loc_prior, r.key_memory, r.loc_prior) == (1.0, 100.0, 0.0, 0.0)
    # keys at the subject keep the prior they were measured with, and drop it with the memory
    subj = ("--key-positions", "subject")
    assert (resolved(*subj).loc_prior, resolved(*subj, "--key-memory", "0").loc_prior) == (20.0, 0.0)
    faithful = configs(MODULES, preset="faithful")[0]
    assert (resolved("--key-memory", "0").loc_prior, faithful.key_memory, faithful.loc_prior) == (0.0, 0.0, 0.0)
    assert (resolved().back_depth, r.back_depth) == (1, 10)
    # EMSEdit's batch editor (one shared hypernetwork) takes 8 steps unless told otherwise.
    assert (resolved("--protocol", "batch").steps, resolved("--protocol", "batch", "--steps", "3").steps) == (8, 3)
    assert resolved("--method", "malmen", "--protocol", "batch").steps == 1
    assert (resolved("--key-memory", "1").key_memory, resolved("--back-depth", "4").memory_slots) == (1.0, 3)
    with pytest.raises(ValueError, match="rank-1"):
        resolved("--method", "mend", "--key-memory", "1")


# ------------------------------------------------------------------ RLEdit training
@pytest.fixture(scope="module")
def rledit_run(tiny_model_dir):
    """A tiny RLEdit run: memory of back_depth - 1 = 2 batches, streams of 3 batches. The
    two tests below call train_step with the same static arguments (one compilation)."""
    model = load_model(tiny_model_dir)
    split = encode_split(model.tokenizer, synthetic_requests(24, seed=1))
    ecfg = method_config("rledit", ("model.layers.3.mlp.up_proj",), rank=8, n_blocks=2, lr_init=0.1, back_depth=3)
    tcfg = TrainConfig(n_edits=4, num_seq=3, epochs=1, meta_lr=1e-3, checkpoint_every=2)
    plan = batch_plan(len(split), tcfg)
    layout = split.layout([b for epoch in plan for b in epoch], tcfg.max_row_len)   # as train() does
    return model, split, ecfg, tcfg, plan, layout


def test_memory_adds_the_weighted_losses_of_earlier_batches(rledit_run):
    model, split, ecfg, tcfg, plan, layout = rledit_run
    lcfg = model.config
    earlier = [split.batch(rows, layout) for rows in plan[0][:2]]
    batch = split.batch(plan[0][2], layout)
    memory = mem.empty_memory(batch, ecfg.memory_slots)
    for n, b in enumerate(earlier):
        memory = mem.push(memory, b, n, ecfg.time_decay)
    np.testing.assert_allclose(np.asarray(memory.weights), [0.95, 0.95 ** 2], rtol=1e-6)
    tx = make_optimizer(tcfg)

    def step(memory):
        state = init_editor(ecfg, lcfg, jax.random.key(0))
        _, _, _, new, metrics, _ = train_step(state.nets, state.stats, tx.init(state.nets), model.params, batch,
                                           zero_deltas(ecfg, lcfg), memory, ecfg=ecfg, lcfg=lcfg, tx=tx,
                                           n_answer=layout.n_answer, beta_power=tcfg.beta_power, only_step=None,
                                           remat=False)
        return new, jax.device_get(metrics)

    new, with_mem = step(memory)
    _, alone = step(memory._replace(weights=jnp.zeros_like(memory.weights)))     # every slot empty

    @jax.jit
    def by_hand(new, b):
        return (edited_loss(lcfg, model.params, b.gen, new, n_answer=layout.rephrase.n_answer)
                + ecfg.loc_coef * kl_locality(lcfg, model.params, b.loc, new, n_answer=layout.loc.n_answer))

    # Sum over the earlier batches (most recent first) of time_decay^age * (paraphrase CE
    # + loc_coef * KL), at the weights after this batch's edit.
    hand = sum(0.95 ** (age + 1) * float(by_hand(new, b)) for age, b in enumerate(reversed(earlier)))
    assert hand > 0
    np.testing.assert_allclose(with_mem["memory_loss"], hand, rtol=1e-5)
    np.testing.assert_allclose(with_mem["loss"], with_mem["gen_loss"] + with_mem["reg_loss"] + hand, rtol=1e-5)
    assert alone["memory_loss"] == 0.0
    np.testing.assert_allclose(alone["loss"], with_mem["gen_loss"] + with_mem["reg_loss"], rtol=1e-6)
    # The memory terms reach the gradient (of this batch's hypernetwork: the only one).
    assert abs(with_mem["grad_norm"] - alone["grad_norm"]) > 1e-6 * alone["grad_norm"]


def test_rledit_trains_with_memory_and_resumes_exactly(rledit_run, tmp_path):
    model, split, ecfg, tcfg, _, _ = rledit_run
    full = train(model, ecfg, tcfg, split, tmp_path / "full", progress=False)
    assert len(full.history) == 6
    for h in full.history:
        assert np.isfinite(h["loss"])
        # The first batch of each stream has no memory; the others carry the earlier ones.
        assert (h["memory_loss"] > 0) == (h["batch"] % 3 != 0), h
        np.testing.assert_allclose(h["loss"], h["gen_loss"] + h["reg_loss"] + h["memory_loss"], rtol=1e-5)
    # Interrupted after batch 5: the last checkpoint is after batch 4, which resumes at
    # stream position 1, so the buffer must be rebuilt from the plan.
    train(model, ecfg, tcfg, split, tmp_path / "resumed", progress=False, stop_after=5)
    resumed = train(model, ecfg, tcfg, split, tmp_path / "resumed", progress=False)
    chex.assert_trees_all_equal(resumed.state.nets, full.state.nets)
    np.testing.assert_array_equal([h["loss"] for h in resumed.history], [h["loss"] for h in full.history])
