"""The Flax adapters: a Llama written as NNX modules (tests/nnx_llama.py) holding the
tiny checkpoint's weights gives the built-in llama's logits, keys, value gradients and
edit deltas, and the same metrics after train -> evaluate through the CLI with
`--model nnx_llama:factory`; the same Llama in Linen gives the same logits, keys and
value gradients; mistakes in module paths and factories are UserErrors."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_llama
from conftest import synthetic_requests
from emsedit_jax.cli import default_modules, main, parse_modules
from emsedit_jax.editor.capture import capture, edited_logits
from emsedit_jax.editor.config import method_config
from emsedit_jax.editor.steps import init_editor, zero_deltas
from emsedit_jax.errors import UserError
from emsedit_jax.evaluate import edit_batch
from emsedit_jax.models import apply_deltas, get_kernel, load_model, logits, save_hf
from emsedit_jax.models.flax_linen import from_linen
from emsedit_jax.models.flax_nnx import from_nnx, module_path
from emsedit_jax.models.hf_io import from_factory
from emsedit_jax.pipeline import encode_split

# The built-in model's module names and the NNX model's paths, both spellings of a path.
NAMES = {"model.layers.2.mlp.up_proj": "layers.2.mlp.up_proj",
         "model.layers.3.mlp.up_proj": "layers[3].mlp.up_proj",
         "model.layers.3.self_attn.o_proj": "layers.3.self_attn.o_proj"}


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    model = load_model(tiny_model_dir)
    module = nnx_llama.from_project(model)
    flax_model = from_nnx(module, model.tokenizer, nnx_llama.EDIT_PATHS)
    split = encode_split(model.tokenizer, synthetic_requests(8, seed=1, ragged=True))
    rows = np.arange(8)
    layout = split.layout([rows])
    return model, flax_model, split.batch(rows, layout).edit, layout.edit.n_answer, module


def renamed(tree):
    return {NAMES[k]: v for k, v in tree.items()}


@functools.partial(jax.jit, static_argnames=("lcfg", "modules", "n_answer"))
@chex.assert_max_traces(n=3)        # one trace per model: built-in, NNX, Linen
def outputs(params, batch, deltas, *, lcfg, modules, n_answer):
    """Logits over every position (unedited, edited), at the answer slots, and the
    capture (loss, keys, value gradients) under `deltas`."""
    ids, mask = batch.input_ids, batch.attention_mask
    return (logits(lcfg, params, ids, mask), logits(lcfg, apply_deltas(lcfg, params, deltas), ids, mask),
            edited_logits(lcfg, params, batch, deltas, n_answer=n_answer),
            capture(lcfg, params, batch, modules, deltas, n_answer=n_answer))


def compare_outputs(model, other, names, batch, n_answer):
    """`other` (a Flax model whose modules `names` maps from the built-in ones) gives
    the built-in model's outputs within 1e-5."""
    rng = np.random.default_rng(0)
    deltas = {m: jnp.asarray(0.1 * rng.standard_normal(get_kernel(model.config, model.params, m).shape), jnp.float32)
              for m in names}

    def run(m, modules, deltas):
        outputs(m.params, batch, jax.tree.map(jnp.zeros_like, deltas), lcfg=m.config, modules=modules,
                n_answer=n_answer)                                             # a second call, no new trace
        return outputs(m.params, batch, deltas, lcfg=m.config, modules=modules, n_answer=n_answer)

    got = run(other, tuple(names.values()), {names[k]: v for k, v in deltas.items()})
    want = run(model, tuple(names), deltas)
    want = (*want[:3], want[3]._replace(keys={names[k]: v for k, v in want[3].keys.items()},
                                        grads={names[k]: v for k, v in want[3].grads.items()}))
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=0)
    assert float(jnp.abs(got[1] - got[0]).max()) > 1e-2                      # the deltas matter
    assert all(float(jnp.abs(g).max()) > 1e-3 for g in got[3].grads.values())


def test_nnx_model_equals_builtin_llama(pair):
    model, fm, batch, n_answer, module = pair
    before = nnx.to_pure_dict(nnx.clone(nnx.state(module, nnx.Param)))
    assert fm.config.modules == ("layers.2.mlp.up_proj", "layers.3.mlp.up_proj", "layers.3.self_attn.o_proj")
    compare_outputs(model, fm, NAMES, batch, n_answer)

    # The deltas of a two-step EMSEdit edit with the key memory.
    def deltas_of(m, modules):
        ecfg = method_config("emsedit", modules, steps=2, rank=8, n_blocks=1, lr_init=0.1, key_memory=1.0)
        state = init_editor(ecfg, m.config, jax.random.key(0))
        out, _ = edit_batch(state, m.params, batch, zero_deltas(ecfg, m.config), ecfg=ecfg, lcfg=m.config,
                            n_answer=n_answer)
        return out

    got, want = deltas_of(fm, tuple(NAMES.values())), renamed(deltas_of(model, tuple(NAMES)))
    # The ridge solve amplifies the keys' float32 rounding (2e-6 apart, the two models
    # sum in different orders): 1e-5 relative to each delta's largest entry.
    for m in want:
        chex.assert_trees_all_close(got[m], want[m], atol=1e-5 * float(jnp.abs(want[m]).max()), rtol=0)
    assert all(float(jnp.abs(d).max()) > 1e-3 for d in got.values())
    # The caller's module is never changed.
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(module, nnx.Param)), before)


def test_linen_model_equals_builtin_llama(pair):
    model, _, batch, n_answer, _ = pair
    module, variables = nnx_llama.linen_from_project(model)
    names = dict(zip(NAMES, ["layers_2.up_proj", "layers_3.up_proj", "layers_3.self_attn.o_proj"]))
    lm = from_linen(module, variables, model.tokenizer, list(names.values()))
    compare_outputs(model, lm, names, batch, n_answer)
    with pytest.raises(UserError, match=r"'layers_9.up_proj'.*no 2-D parameter layers_9.up_proj.kernel"):
        from_linen(module, variables, model.tokenizer, ["layers_9.up_proj"])


def test_cli_train_evaluate_on_nnx_model_matches_builtin(tiny_model_dir, tmp_path, monkeypatch):
    """The README example: EMSEdit trained and evaluated on `--model package.module:factory`."""
    monkeypatch.setenv("EMSEDIT_NNX_LLAMA", str(tiny_model_dir))
    from test_cli import write_user_file
    data = write_user_file(tmp_path / "edits.jsonl", synthetic_requests(16, seed=5))
    common = ["--dataset", "user", "--data", str(data), "--n-train", "8", "--n-test", "8", "--split-seed", "1",
              "--quiet"]
    train = ["--method", "emsedit", "--epochs", "1", "--n-edits", "4", "--num-seq", "2", "--rank", "8", "--blocks",
             "1", "--lr-init", "0.1", "--meta-lr", "1e-3", "--max-update", "0.1"]   # the tiny model needs bigger steps
    results = {}
    for tag, spec, module in [("nnx", "nnx_llama:factory", "layers[1].mlp.up_proj"),   # not an edit path
                              ("hf", str(tiny_model_dir), "model.layers.1.mlp.up_proj")]:
        main(["train", "--model", spec, *common, *train, "--modules", module, "--out", str(tmp_path / tag)])
        results[tag] = main(["evaluate", "--editor", str(tmp_path / tag / "editor"), "--num-seq", "2",
                             "--n-edits", "4", "--quiet"])
    nnx_run, hf_run = results["nnx"], results["hf"]
    assert nnx_run["config"]["model"]["model"] == "nnx_llama:factory"
    assert nnx_run["baseline"] == hf_run["baseline"] and nnx_run["metrics"] == hf_run["metrics"]
    assert nnx_run["metrics"]["ES"] > nnx_run["baseline"]["ES"]

    # The Python API on the same factory and editor.
    import emsedit_jax as ej
    model = ej.load_model("nnx_llama:factory")
    assert str(model.path) == "nnx_llama:factory"        # what a run records, to load it again
    editor = ej.load_editor(tmp_path / "nnx" / "editor", model)
    edited = ej.edit(model, editor, [ej.Fact("w1 w2 w3", "w4")])
    assert set(edited.deltas) == {"layers[1].mlp.up_proj"} and float(abs(edited.deltas["layers[1].mlp.up_proj"]).max()) > 0
    assert ej.generate(edited, "w1 w2 w3", max_new_tokens=1) == "w4"


def test_bad_paths_and_factories_are_user_errors(pair, monkeypatch):
    model, fm, _, _, _ = pair
    module = nnx_llama.from_project(model)
    assert module_path("layers[18].mlp.up_proj") == module_path("layers.18.mlp.up_proj") == ("layers", 18, "mlp",
                                                                                              "up_proj")
    with pytest.raises(UserError, match=r"'layers\[9\].mlp.up_proj'.*no module there"):
        from_nnx(module, model.tokenizer, ["layers[9].mlp.up_proj"])
    with pytest.raises(UserError, match=r"'layers.1.input_layernorm'.*RMSNorm is not a linear module"):
        from_nnx(module, model.tokenizer, ["layers.1.input_layernorm"])
    with pytest.raises(UserError, match=r"module path 'layers\[x\]'"):
        from_nnx(module, model.tokenizer, ["layers[x]"])
    assert fm.config.module_shape("layers[0].mlp.down_proj") == (64, 32)     # not an edit path, but linear
    with pytest.raises(UserError, match=r"'layers.0.input_layernorm' is not a linear module.*its 28 linear modules"):
        fm.config.module_shape("layers.0.input_layernorm")
    assert default_modules(fm.config) == fm.config.modules
    with pytest.raises(UserError, match="for a Flax model pass --modules"):
        parse_modules(None, "2-3", None, fm.config)
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        from_factory("no_such_module:factory")
    with pytest.raises(UserError, match="has no function 'nope'"):
        from_factory("nnx_llama:nope")
    with pytest.raises(UserError, match="a model factory sets its own dtypes"):
        load_model("nnx_llama:factory", dtype=jnp.bfloat16)
    with pytest.raises(UserError, match="not saved as a Hugging Face checkpoint"):
        save_hf(fm, "unused")
    monkeypatch.setattr(nnx_llama, "returns_none", lambda: None, raising=False)
    with pytest.raises(UserError, match=r"returns_none\(\) returned NoneType, expected a Model"):
        from_factory("nnx_llama:returns_none")


def test_shapes_are_checked_at_trace_time(pair):
    """chex checks at the editor's entry points and in the solve name what is wrong."""
    from emsedit_jax.editor import solve
    model, fm, batch, n_answer, _ = pair
    for m, name in [(model, "model.layers.2.mlp.up_proj"), (fm, "layers[2].mlp.up_proj")]:
        with pytest.raises(AssertionError, match=r"delta of .*up_proj"):
            capture(m.config, m.params, batch, (name,), {name: jnp.zeros((64, 32))}, n_answer=n_answer)
    with pytest.raises(AssertionError, match="assert_equal_shape"):
        capture(model.config, model.params, batch._replace(labels=batch.labels[:, :-1]), tuple(NAMES),
                n_answer=n_answer)
    with pytest.raises(AssertionError, match="assert_shape"):
        solve.ridge(jnp.ones((3, 4)), jnp.ones((3, 5)), jnp.zeros(()), prior=jnp.eye(5))
    with pytest.raises(AssertionError, match="assert_equal_shape_prefix"):
        solve.ridge(jnp.ones((3, 4)), jnp.ones((2, 5)), jnp.zeros(()))


def test_small_deltas_survive_bfloat16_kernels(pair):
    """A bfloat16 kernel cannot hold W + dW for a small dW: the adapter applies such a
    delta as a separate product, so its effect on the logits is the float32 model's."""
    model, fm, batch, n_answer, _ = pair
    module = nnx_llama.from_project(model)
    nnx.update(module, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(module, nnx.Param)))
    low = from_nnx(module, model.tokenizer, nnx_llama.EDIT_PATHS)
    deltas = {"layers.2.mlp.up_proj": jnp.full((32, 64), 1e-3, jnp.float32)}

    def effect(m, deltas):
        return (edited_logits(m.config, m.params, batch, deltas, n_answer=n_answer)[0]
                - edited_logits(m.config, m.params, batch, None, n_answer=n_answer)[0])

    want = effect(fm, deltas)
    got = effect(low, deltas)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.05
    # Added into the bfloat16 kernels, most of it would be lost to rounding.
    in_kernels = (edited_logits(low.config, apply_deltas(low.config, low.params, deltas), batch, None,
                                n_answer=n_answer)[0]
                  - edited_logits(low.config, low.params, batch, None, n_answer=n_answer)[0])
    assert float(jnp.linalg.norm(in_kernels - want) / jnp.linalg.norm(want)) > 0.3
