"""Meta-training on a tiny model: resuming after an interruption gives the same
parameters as an uninterrupted run; a short train -> evaluate raises ES above the
unedited model; the faithful schedules run; a run folder refuses another run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import synthetic_requests
from emsedit_jax.checkpoint import load_editor
from emsedit_jax.editor.config import EditorConfig
from emsedit_jax.editor.steps import init_editor
from emsedit_jax.evaluate import run_protocol
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split
from emsedit_jax.train import TrainConfig, batch_plan, train

MODULES = ("model.layers.2.mlp.up_proj", "model.layers.3.mlp.up_proj")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir)
    return model, encode_split(model.tokenizer, synthetic_requests(40, seed=1))


def synthetic_split(model, n, seed=11):
    return encode_split(model.tokenizer, synthetic_requests(n, seed=seed))


def ecfg(**kw):
    # The authors' linear step size, regulariser weight and T = 2, which these tests were sized
    # for (fewer steps compile faster), and the looser trust region of training (the tiny
    # model's random weights need large steps).
    return EditorConfig(modules=MODULES, rank=8, n_blocks=2, lr_init=0.1, log_step_size=False, beta=0.5,
                        **{"key_memory": 0.0, "max_update": 0.1, "steps": 2, **kw})


def test_batch_plan_is_seeded_and_covers_epochs():
    t = TrainConfig(n_edits=4, epochs=2, seed=3)
    a, b = batch_plan(18, t), batch_plan(18, t)
    assert len(a) == 2 and all(len(e) == 4 for e in a)
    assert all(np.array_equal(x, y) for ea, eb in zip(a, b) for x, y in zip(ea, eb))
    assert not np.array_equal(np.concatenate(a[0]), np.concatenate(a[1]))
    assert len(set(np.concatenate(a[0]).tolist())) == 16


def test_resume_after_interruption_equals_uninterrupted(tiny, tmp_path):
    model, split = tiny
    tcfg = TrainConfig(n_edits=4, num_seq=3, epochs=2, meta_lr=1e-3, checkpoint_every=2)
    full = train(model, ecfg(), tcfg, split, tmp_path / "full", progress=False)
    # "Kill" after 5 batches: the last checkpoint is at batch 4, so batch 5 is redone.
    train(model, ecfg(), tcfg, split, tmp_path / "resumed", progress=False, stop_after=5)
    resumed = train(model, ecfg(), tcfg, split, tmp_path / "resumed", progress=False)
    assert len(resumed.history) == len(full.history) == 20
    chex.assert_trees_all_equal(resumed.state.nets, full.state.nets)
    chex.assert_trees_all_equal(resumed.state.stats, full.state.stats)
    # ...and training changed the editor.
    moved = max(float(np.abs(np.asarray(blk["B"])).max()) for net in full.state.nets["32x64"] for blk in net["blocks"])
    assert moved > 0
    # The saved editor round-trips.
    e2, st2, record = load_editor(tmp_path / "full" / "editor", model.config)
    assert e2 == ecfg() and record["train"]["epochs"] == 2
    chex.assert_trees_all_equal(st2.nets, full.state.nets)
    # Arrays that do not fit the recorded configuration (here one block more) are refused
    # with the folder named, not restored into a wrong structure.
    bad = tmp_path / "bad_editor"
    shutil.copytree(tmp_path / "full" / "editor", bad)
    rec = json.loads((bad / "editor.json").read_text())
    rec["editor"]["n_blocks"] += 1
    (bad / "editor.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="bad_editor.*saved arrays do not fit"):
        load_editor(bad, model.config)
    check_editor_integrity(model, tmp_path / "full" / "editor", tmp_path)


def check_editor_integrity(model, editor, tmp_path):
    """A saved editor records its model and a checksum of its arrays: two flipped bytes
    in its state, or another model's architecture, are refused with a one-line message."""
    from emsedit_jax.checkpoint import CheckpointError
    from emsedit_jax.runs import RunError, config_sha256, tree_sha256
    record = json.loads((editor / "editor.json").read_text())
    assert record["model"]["config_sha256"] == config_sha256(model.config)
    assert record["model"]["layer_shapes"] == {m: [32, 64] for m in MODULES}
    _, state, _ = load_editor(editor, model.config)
    assert record["state_sha256"] == tree_sha256({"nets": state.nets, "stats": state.stats})
    # Two flipped bytes in the largest array file.
    flipped = tmp_path / "flipped_editor"
    shutil.copytree(editor, flipped)
    biggest = max((f for f in (flipped / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    for k in (len(raw) // 2, len(raw) // 2 + 1):
        raw[k] ^= 0xFF
    biggest.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"flipped_editor/state: the files do not match the checksums") as e:
        load_editor(flipped, model.config)
    assert "\n" not in str(e.value)
    # Another model: one layer more changes the architecture hash.
    other = dataclasses.replace(model.config, num_layers=5)
    with pytest.raises(RunError) as e:
        load_editor(editor, other, model_name="other-model")
    msg = str(e.value)
    assert f"this editor was made for model {record['model']['name']!r}" in msg and "not for 'other-model'" in msg
    assert msg.endswith(f"the architecture (config hash) differs; pass --model {record['model']['name']}")
    wider = dataclasses.replace(model.config, intermediate_size=model.config.intermediate_size * 2)
    with pytest.raises(RunError, match=r"the architecture \(config hash\) and the edited layer shapes differ"):
        load_editor(editor, wider)
    garbage = tmp_path / "garbage_editor"
    shutil.copytree(editor, garbage)
    (garbage / "editor.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"garbage_editor/editor\.json: not a valid editor record"):
        load_editor(garbage, model.config)


def test_other_run_in_same_folder_is_refused(tiny, tmp_path):
    from emsedit_jax.runs import RunError
    model, split = tiny
    tcfg = TrainConfig(n_edits=4, num_seq=2, epochs=1, meta_lr=1e-3)
    run = tmp_path / "run"
    train(model, ecfg(), tcfg, split, run, progress=False, stop_after=1)
    with pytest.raises(RunError, match=r"run holds another training run \(it differs in train\.seed\); use another"):
        train(model, ecfg(), dataclasses.replace(tcfg, seed=9), split, run, progress=False)
    train(model, ecfg(), tcfg, split, run, progress=False)       # the same run resumes and finishes
    editor_json = (run / "editor" / "editor.json").read_text()
    # A finished folder: other data of the same size, another dtype label, another
    # seed are all refused; the same run again leaves the editor as it was.
    other_data = encode_split(model.tokenizer, synthetic_requests(40, seed=2))
    with pytest.raises(RunError, match=r"differs in train_requests_sha256\)"):
        train(model, ecfg(), tcfg, other_data, run, progress=False)
    with pytest.raises(RunError, match=r"differs in dtype, split\)"):
        train(model, ecfg(), tcfg, split, run, progress=False, identity={"dtype": "bfloat16", "split": {"split_seed": 1}})
    train(model, ecfg(), tcfg, split, run, progress=False)
    assert (run / "editor" / "editor.json").read_text() == editor_json
    # The lock: one held by a live process (here the parent of this one) stops a
    # second writer; one left by a process that is gone is taken over.
    host = socket.gethostname()
    (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))
    with pytest.raises(RunError, match=rf"run is being written by another process \(pid {os.getppid()}\)"):
        train(model, ecfg(), tcfg, split, run, progress=False)
    (run / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": host}))
    train(model, ecfg(), tcfg, split, run, progress=False)
    assert not (run / ".lock").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@contextlib.contextmanager
def backend_compiles():
    """The names of the functions XLA compiles inside the block."""
    names = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_train_then_evaluate_raises_efficacy(tiny, tmp_path):
    model, _ = tiny
    train_split = encode_split(model.tokenizer, synthetic_requests(48, seed=2))
    test_split = encode_split(model.tokenizer, synthetic_requests(12, seed=3))
    tcfg = TrainConfig(n_edits=4, num_seq=3, epochs=3, meta_lr=1e-3)
    cfg = ecfg()
    # One layout, one compile of the step, in training (3 streams of 3 batches) and in
    # editing an editor loaded from its folder: jit compiles again when arguments that were a
    # mix of fresh (uncommitted) and restored or returned (committed) arrays become all
    # committed, so the loops commit theirs first.
    with backend_compiles() as compiled:
        res = train(model, cfg, tcfg, train_split, tmp_path / "run", progress=False)
        _, state, _ = load_editor(tmp_path / "run" / "editor", model.config)    # as `evaluate` does
        ev = run_protocol(model, cfg, state, test_split, protocol="sequential", num_seq=3, n_edits=4,
                          metric="zsre", progress=False)
    assert compiled.count("jit(train_step)") <= 1 and compiled.count("jit(edit_batch)") <= 1, compiled
    # The meta-training objective (paraphrase loss + regulariser) goes down.
    per_epoch = [np.mean([h["loss"] for h in res.history if h["epoch"] == e]) for e in range(3)]
    assert per_epoch[-1] < per_epoch[0], per_epoch
    assert ev.n_requests == 12
    assert ev.metrics["ES"] > ev.baseline["ES"] + 20, (ev.metrics, ev.baseline)


@pytest.mark.parametrize("protocol", ["sequential", "batch"])
def test_faithful_schedules_run(tiny, tmp_path, protocol):
    model, split = tiny
    tcfg = TrainConfig(protocol=protocol, schedule="faithful", n_edits=4, num_seq=3, epochs=1, meta_lr=1e-3)
    cfg = ecfg(step_specific=protocol == "sequential")
    res = train(model, cfg, tcfg, split, tmp_path / protocol, progress=False)
    assert all(np.isfinite(h["loss"]) for h in res.history)
    before = jax.tree.leaves(init_editor(cfg, model.config, jax.random.key(0)).nets)
    after = jax.tree.leaves(res.state.nets)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_bucketed_layouts_cut_padding_not_results(tiny, tmp_path):
    """Batches packed in a few layouts (buckets) instead of one: less padding, at most
    `buckets` shapes, every batch fits its own, and training sees the same losses."""
    model, _ = tiny
    split = encode_split(model.tokenizer, synthetic_requests(48, seed=4, ragged=True))
    plan = [np.arange(i * 8, i * 8 + 8) for i in range(6)]
    single, layouts = split.layout(plan), split.layouts(plan, buckets=3)
    assert split.layouts(plan, buckets=1) == [single] * 6
    assert 1 < len(set(layouts)) <= 3

    def slots(lay):     # padded tokens + answer slots over all views
        return sum(v.n_rows * (v.row_len + v.n_answer) for v in (lay.edit, lay.rephrase, lay.loc))

    assert sum(map(slots, layouts)) < 6 * slots(single)
    for rows, lay in zip(plan, layouts):
        split.batch(rows, lay)          # raises if the batch does not fit
    tcfg = TrainConfig(n_edits=8, num_seq=3, epochs=1, meta_lr=1e-3)
    assert len(set(split.layouts(batch_plan(48, tcfg)[0], buckets=3))) > 1     # train() buckets its own plan
    runs = [train(model, ecfg(), dataclasses.replace(tcfg, buckets=k), split, tmp_path / str(k), progress=False)
            for k in (1, 3)]
    for key in ("loss", "gen_loss", "reg_loss"):
        np.testing.assert_allclose([h[key] for h in runs[1].history], [h[key] for h in runs[0].history],
                                   rtol=2e-4, atol=1e-7)


def test_back_depth_gives_emsedit_the_memory_terms(tiny, tmp_path):
    """EMSEdit with back_depth 3 (an extension: RLEdit's memory backtracking with the norm
    regulariser): every batch but a stream's first adds its earlier batches' losses, and
    the editor differs from the one trained without them."""
    model, split = tiny
    tcfg = TrainConfig(n_edits=4, num_seq=3, epochs=1, meta_lr=1e-3)
    with_mem = train(model, ecfg(back_depth=3), tcfg, split, tmp_path / "mem", progress=False)
    plain = train(model, ecfg(), tcfg, split, tmp_path / "plain", progress=False)
    assert len(with_mem.history) == 10
    for h in with_mem.history:
        assert (h["memory_loss"] > 0) == (h["batch"] % 3 != 0), h
        np.testing.assert_allclose(h["loss"], h["gen_loss"] + h["reg_loss"] + h["memory_loss"], rtol=1e-5)
    assert all("memory_loss" not in h for h in plain.history)
    # A stream's first batch is trained identically; the memory changes what follows.
    np.testing.assert_allclose(with_mem.history[0]["loss"], plain.history[0]["loss"], rtol=1e-6)
    assert not np.allclose(with_mem.history[2]["loss"], plain.history[2]["loss"], rtol=1e-4)


def test_key_memory_run_resumes_mid_stream(tiny, tmp_path):
    """With key memory the checkpoint holds the stream's key Gram matrices: a run killed
    mid-stream resumes to the same editor. The memory changes training from the second
    batch of a stream on, not before."""
    model, split = tiny
    tcfg = TrainConfig(n_edits=4, num_seq=3, epochs=1, meta_lr=1e-3, checkpoint_every=2)
    cfg = ecfg(key_memory=1.0, loc_prior=0.0)
    full = train(model, cfg, tcfg, split, tmp_path / "full", progress=False)
    # Killed after 5 batches: the checkpoint after batch 4 is in the middle of a stream.
    train(model, cfg, tcfg, split, tmp_path / "resumed", progress=False, stop_after=5)
    resumed = train(model, cfg, tcfg, split, tmp_path / "resumed", progress=False)
    chex.assert_trees_all_equal(resumed.state.nets, full.state.nets)
    np.testing.assert_array_equal([h["loss"] for h in resumed.history], [h["loss"] for h in full.history])
    plain = train(model, ecfg(), tcfg, split, tmp_path / "plain", progress=False)
    np.testing.assert_allclose(full.history[0]["loss"], plain.history[0]["loss"], rtol=1e-6)
    assert not np.allclose(full.history[1]["loss"], plain.history[1]["loss"], rtol=1e-4)


@pytest.mark.parametrize("positions", ["keys", "all"])
def test_locality_gram_is_the_mean_outer_product_of_locality_keys(tiny, positions):
    """C0 of the locality prior, accumulated over packed batches of 4, equals the mean
    k k^T of the keys captured in one pass over the unpacked locality prompts: at their
    answer slots ("keys") or at every token but each prompt's first ("all")."""
    from emsedit_jax.editor.capture import IGNORE, Batch, capture
    from emsedit_jax.evaluate import locality_gram
    model, split = tiny
    cfg = ecfg(key_memory=1.0, loc_prior=5.0, prior_positions=positions)
    c0 = locality_gram(model, cfg, split, n_edits=4, progress=False)
    tf = split.views["loc"]                   # one right-padded row per request
    ids, att = tf.input_ids, tf.attention_mask
    if positions == "keys":
        labels, n_slots = tf.labels, tf.n_answer
    else:
        labels = np.where((att > 0) & (np.arange(ids.shape[1]) > 0), 0, IGNORE).astype(np.int32)
        n_slots = ids.shape[1]
    cap = capture(model.config, model.params, Batch(jnp.asarray(ids), jnp.asarray(att), jnp.asarray(labels)),
                  MODULES, n_answer=n_slots)
    mask = np.asarray(cap.mask).reshape(-1)
    assert mask.sum() == (att.sum() - len(split) if positions == "all" else (tf.labels != IGNORE).sum())
    assert mask.sum() >= len(split)          # every request has a locality answer
    (key, gram), = c0.items()                # both modules have one kernel shape
    for i, m in enumerate(MODULES):
        u = np.asarray(cap.keys[m], np.float64).reshape(mask.size, -1)[mask]
        np.testing.assert_allclose(gram[i], u.T @ u / len(u), rtol=1e-4, atol=1e-6)


def test_editor_keeps_the_prior_it_was_trained_with(tiny, tmp_path):
    """Trained with a locality prior and no C0 given, `train` estimates C0 from the
    training requests' locality prompts, saves it with the editor, and `load_editor`
    gives it back: editing with the stored C0 is editing with the C0 computed again."""
    from emsedit_jax.evaluate import preserved_gram
    model, split = tiny
    cfg = ecfg(key_memory=1.0, loc_prior=5.0, prior_positions="all")
    res = train(model, cfg, TrainConfig(n_edits=4, num_seq=2, epochs=1, meta_lr=1e-3), split, tmp_path / "p",
                progress=False)
    c0 = preserved_gram(model, cfg, split.requests, n_edits=4, progress=False)
    loaded, state, record = load_editor(tmp_path / "p" / "editor", model.config)
    assert loaded.prior_positions == "all" and record["has_prior"] and set(state.prior) == set(c0)
    for key in c0:
        np.testing.assert_allclose(state.prior[key], c0[key], rtol=1e-6)
        np.testing.assert_allclose(res.state.prior[key], c0[key], rtol=1e-6)
    test = synthetic_split(model, 8)
    kw = dict(protocol="sequential", num_seq=2, n_edits=4, metric="zsre", progress=False)
    own = run_protocol(model, cfg, state, test, **kw)
    given = run_protocol(model, cfg, state._replace(prior={}), test, key_prior=c0, **kw)
    assert float(np.abs(np.asarray(own.deltas[MODULES[0]])).max()) > 0
    for m in own.deltas:
        np.testing.assert_allclose(own.deltas[m], given.deltas[m], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="holds no C0"):
        run_protocol(model, cfg, state._replace(prior={}), test, **kw)
    # A sparser curve: every second batch and the last, each point the edited requests so far.
    sparse = run_protocol(model, cfg, state, test, **{**kw, "num_seq": 2, "n_edits": 3}, full_curve=True,
                          curve_every=2)
    assert [p["batches"] for p in sparse.curve] == [2]
    every = run_protocol(model, cfg, state, synthetic_split(model, 9), protocol="sequential", num_seq=3, n_edits=3,
                         metric="zsre", progress=False, full_curve=True, curve_every=2)
    assert [p["batches"] for p in every.curve] == [2, 3]


@pytest.mark.parametrize("margin", [0.0, 1e9])
def test_selection_by_validation_keeps_the_best_scored_editor(tiny, tmp_path, margin):
    """With select_every the untrained editor, every select_every batches and the end are
    scored on the held-out split; the saved editor is the best scored one (margin 0), or
    the untrained one when no editor can beat it by the margin."""
    from emsedit_jax.checkpoint import load_editor
    model, split = tiny
    fit = dataclasses.replace(split, requests=split.requests[:8],
                              views={k: _rows(v, slice(0, 8)) for k, v in split.views.items()})
    val = dataclasses.replace(split, requests=split.requests[8:12],
                              views={k: _rows(v, slice(8, 12)) for k, v in split.views.items()})
    tcfg = TrainConfig(protocol="batch", n_edits=4, num_seq=1, epochs=2, meta_lr=1e-2, select_every=2,
                       select_margin=margin)
    cfg = ecfg(step_specific=False)
    res = train(model, cfg, tcfg, fit, tmp_path / "sel", progress=False, val_split=val)
    scores = [h for h in res.history if "validation_after_batches" in h]
    assert [h["validation_after_batches"] for h in scores] == [0, 2, 4]
    record = json.loads((tmp_path / "sel" / "editor" / "editor.json").read_text())
    best = max(scores, key=lambda h: h["ES"] + h["GS"] + h["LS"]) if margin == 0 else scores[0]
    assert record["selected_after_batches"] == best["validation_after_batches"]
    assert record["selected_score"] == pytest.approx(best["ES"] + best["GS"] + best["LS"])
    _, saved, _ = load_editor(tmp_path / "sel" / "editor", model.config)
    if best["validation_after_batches"] == 0:
        init = init_editor(cfg, model.config, jax.random.key(0))
        chex.assert_trees_all_equal(saved.nets, init.nets)


def test_selection_margin_is_in_standard_errors_of_the_paired_difference():
    """A later editor replaces the best one only when the mean of their per-request
    score differences exceeds margin x its standard error."""
    from emsedit_jax.train import Validated, _keep_better
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 300, 100)
    best = Validated(float(base.mean()), None, 0, base)
    noise = rng.normal(0, 10, 100)
    noise = (noise - noise.mean()) / noise.std(ddof=1) * 10        # sd 10, so se 1
    small = base + 1.5 + noise                                    # +1.5 = 1.5 standard errors
    cand = Validated(float(small.mean()), None, 1, small)
    assert _keep_better(best, cand, margin=2.0) is best
    assert _keep_better(best, cand, margin=1.0) is cand
    steady = base + 0.5                                           # every request gains: no noise
    cand = Validated(float(steady.mean()), None, 2, steady)
    assert _keep_better(best, cand, margin=2.0) is cand
    worse = Validated(float(base.mean()) - 1, None, 3, base - 1)
    assert _keep_better(best, worse, margin=0.0) is best


def _rows(tf, rows):
    return dataclasses.replace(tf, **{f.name: getattr(tf, f.name)[rows] for f in dataclasses.fields(tf)
                                      if isinstance(getattr(tf, f.name), np.ndarray)})


def test_training_edits_under_its_own_trust_region(tiny_model_dir):
    """train_step edits with EditorConfig.train_max_update, editing with max_update: with a
    cap of 1e-4 ||W|| for editing and none to speak of for training, the training step's
    deltas are the uncapped edit's, and the edit's every step stays within its cap."""
    import optax
    from emsedit_jax.editor.steps import zero_deltas
    from emsedit_jax.evaluate import edit_batch
    from emsedit_jax.models.transformer import get_kernel
    from emsedit_jax.train import train_step
    model = load_model(tiny_model_dir)
    lcfg = model.config
    split = encode_split(model.tokenizer, synthetic_requests(4, seed=5))
    rows = np.arange(4)
    layout = split.layout([rows])
    batch = split.batch(rows, layout)
    free = EditorConfig(modules=MODULES, rank=8, n_blocks=2, lr_init=0.1, key_memory=0.0, steps=2, max_update=0.0)
    assert free.train_max_update == 0.0
    both = dataclasses.replace(free, max_update=1e-4, train_max_update=1e6)
    state = init_editor(free, lcfg, jax.random.key(0))
    zero = zero_deltas(free, lcfg)
    uncapped, _ = edit_batch(state, model.params, batch.edit, zero, ecfg=free, lcfg=lcfg,
                             n_answer=layout.edit.n_answer)
    capped, _ = edit_batch(state, model.params, batch.edit, zero, ecfg=both, lcfg=lcfg,
                           n_answer=layout.edit.n_answer)
    tx = optax.sgd(0.1)
    trained = train_step(state.nets, state.stats, tx.init(state.nets), model.params, batch, zero, ecfg=both,
                         lcfg=lcfg, tx=tx, n_answer=layout.n_answer)[3]
    for m in MODULES:
        w_norm = float(np.linalg.norm(get_kernel(lcfg, model.params, m)))
        assert np.linalg.norm(uncapped[m]) > 10 * 2e-4 * w_norm                 # the edit cap binds
        assert np.linalg.norm(capped[m]) <= 2e-4 * w_norm * (1 + 1e-5)          # two steps of at most 1e-4
        np.testing.assert_allclose(trained[m], uncapped[m], rtol=1e-4, atol=1e-6 * float(np.abs(uncapped[m]).max()))


def test_held_out_validation_defaults_to_one_stream_or_batch_when_there_is_room():
    """Selection by validation is on by default for both protocols: one validation stream
    (sequential) or batch is held out when the requests leave at least a training batch;
    by default too few requests turn it off, asked for explicitly they are an error."""
    from emsedit_jax.errors import ConfigError
    from emsedit_jax.train import held_out
    seq = TrainConfig(n_edits=10, num_seq=10)
    assert seq.select_every == 10 and held_out(seq, 500) == 100 and held_out(seq, 110) == 100
    assert held_out(seq, 109) == 0 and held_out(seq, 500, n_val=150) == 150
    with pytest.raises(ConfigError, match="109 training requests"):
        held_out(seq, 109, explicit=True)
    with pytest.raises(ConfigError, match="--n-val 50"):
        held_out(seq, 500, n_val=50)
    batch = TrainConfig(protocol="batch", n_edits=100)
    assert batch.select_every == 1 and held_out(batch, 500) == 100 and held_out(batch, 150) == 0
    assert held_out(TrainConfig(select_every=0), 500) == 0
