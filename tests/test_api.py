"""The Python API (emsedit_jax top level): the README's quickstart run verbatim on the
tiny model, sequential edits continuing one stream, rollback, train / evaluate."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from conftest import synthetic_requests

README = Path(__file__).resolve().parents[1] / "README.md"
# The quickstart as the README shows it (the first ```python block under "## Python"
# there, once the README has one); this copy is used until then.
QUICKSTART = '''
import emsedit_jax as ej

model = ej.load_model("smollm2")                    # embedded model, Hugging Face folder or hub id
editor = ej.load_editor("runs/demo/editor", model)  # an editor trained for this model
edited = ej.edit(model, editor, [ej.Fact("The capital of France is", "Rome")])
print(ej.generate(edited, "The capital of France is"))
edited.save("runs/edited")                          # a Hugging Face folder
'''


def quickstart() -> str:
    if README.is_file():
        m = re.search(r"^## Python[^\n]*\n.*?```python\n(.*?)```", README.read_text(), re.S | re.M)
        if m:
            return m.group(1)
    return QUICKSTART


def test_quickstart_runs_verbatim(tiny_model_dir, tiny_editor_dir, tmp_path, monkeypatch):
    """The snippet with the tiny model and editor in place of the embedded model and the
    demo editor, and words of the tiny vocabulary in place of the fact's: it edits,
    prints a completion and saves a folder that loads."""
    import emsedit_jax as ej
    code = quickstart()
    for name in ('"smollm2"', '"runs/demo/editor"', '"runs/edited"'):
        assert name in code, f"the quickstart no longer names {name}; update this test"
    code = code.replace('"smollm2"', repr(str(tiny_model_dir))).replace('"runs/demo/editor"', repr(str(tiny_editor_dir)))
    code = code.replace('"The capital of France is"', '"w1 w2 w3"').replace('"Rome"', '"w4"')
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README quickstart", "exec"), scope)
    assert printed.getvalue().strip()
    edited, model = scope["edited"], scope["model"]
    assert isinstance(edited, ej.EditedModel) and edited.facts == (ej.Fact("w1 w2 w3", "w4"),)
    (module, delta), = edited.deltas.items()
    assert float(np.abs(delta).max()) > 0
    saved = ej.load_model(tmp_path / "runs" / "edited")
    kernel = saved.params["layers"][3]["mlp"]["up_proj"]["kernel"]
    base = model.params["layers"][3]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_allclose(kernel, base + delta, atol=1e-6)


def test_edits_continue_one_stream_and_roll_back(tiny_model_dir, tiny_editor_dir):
    """edit(edited, ...) is the next batch of the same stream: the same deltas and key
    memory as the two batches edited in sequence by hand; rolling back is the base."""
    import emsedit_jax as ej
    from emsedit_jax.evaluate import edit_batch
    from emsedit_jax.editor.steps import new_stream, zero_deltas
    from emsedit_jax.pipeline import encode_split
    model = ej.load_model(tiny_model_dir)
    editor = ej.load_editor(tiny_editor_dir, model)
    editor.config = __import__("dataclasses").replace(editor.config, key_memory=1.0)
    reqs = synthetic_requests(4, seed=11)
    first = ej.edit(model, editor, [(r.prompt, r.target_new) for r in reqs[:2]])
    second = ej.edit(first, editor, [ej.Fact(r.prompt, r.target_new, subject="x") for r in reqs[2:]])
    assert len(second.facts) == 4 and second.base is model
    deltas, state = zero_deltas(editor.config, model.config), new_stream(editor.config, model.config, editor.state)
    for part in (reqs[:2], reqs[2:]):
        facts = [ej.EditRequest(r.prompt, r.target_new, r.prompt, r.prompt, r.target_new) for r in part]
        split = encode_split(model.tokenizer, facts)
        layout = split.layout([np.arange(2)])
        deltas, state = edit_batch(state, model.params, split.batch(np.arange(2), layout).edit, deltas,
                                   ecfg=editor.config, lcfg=model.config, n_answer=layout.edit.n_answer)
    chex.assert_trees_all_close(second.deltas, deltas, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(second.stream.key_gram, state.key_gram, rtol=1e-6, atol=1e-7)
    assert any(float(np.abs(g).max()) > 0 for g in second.stream.key_gram.values())
    prompts = [r.prompt for r in reqs]
    assert ej.generate(second.base, prompts, max_new_tokens=2) == ej.generate(model, prompts, max_new_tokens=2)
    assert isinstance(ej.generate(second, prompts[0], max_new_tokens=2), str)
    with pytest.raises(ej.UserError, match="fact 0: target"):
        ej.edit(model, editor, [ej.Fact("w1 w2", " ")])


def test_evaluate_returns_scores(tiny_model_dir, tiny_editor_dir):
    import emsedit_jax as ej
    model = ej.load_model(tiny_model_dir)
    editor = ej.load_editor(tiny_editor_dir, model)
    res = ej.evaluate_editor(model, editor, synthetic_requests(4, seed=12), protocol="batch", n_edits=4)
    assert isinstance(res, ej.EvalResult) and res.n_requests == 4
    assert set(res.metrics) == set(res.baseline) == {"ES", "GS", "LS"}
    with pytest.raises(ej.ConfigError, match="EvalConfig.n_edits"):
        ej.evaluate_editor(model, editor, synthetic_requests(4), n_edits=0)
    # C0 taken elsewhere than the editor's needs the training requests, which the API has not.
    with pytest.raises(ej.UserError, match="C0 was taken at prior_positions='keys', not 'all'"):
        ej.evaluate_editor(model, editor, synthetic_requests(4), prior_positions="all")


def test_train_editor_takes_a_preset(tiny_model_dir):
    """preset="counterfact" trains the CLI's CounterFact editor: keys at the subject, the
    middle layers' modules, T = 6, with C0 kept."""
    import emsedit_jax as ej
    model = ej.load_model(tiny_model_dir)
    tcfg = ej.TrainConfig(n_edits=4, num_seq=1, select_every=0)     # no validation runs: the configs are the point
    editor = ej.train_editor(model, synthetic_requests(8, seed=5), tcfg, preset="counterfact")
    want = ej.configs(preset="counterfact", model_cfg=model.config)[0]
    assert editor.config == want and want.key_positions == "subject" and want.steps == 6
    assert want.modules == ej.default_modules(model.config, "subject") != ej.default_modules(model.config)
    assert editor.state.prior
    prompt = "w1 w2 w3 w4"
    with pytest.raises(ej.UserError, match=r"fact 0: this editor reads its keys at the subject"):
        ej.edit(model, editor, [ej.Fact(prompt, "w5")])
    with pytest.raises(ej.UserError, match=r"fact 1: .*subject 'w9'"):
        ej.edit(model, editor, [ej.Fact(prompt, "w5", "w2"), ej.Fact(prompt, "w6", "w9")])
    edited = ej.edit(model, editor, [ej.Fact(prompt, "w5", "W2")])       # found ignoring case
    assert set(edited.deltas) == set(want.modules) and all(float(abs(d).max()) > 0 for d in edited.deltas.values())
    with pytest.raises(ej.ConfigError, match="unknown preset 'zsre'"):
        ej.train_editor(model, synthetic_requests(8, seed=5), tcfg, preset="zsre")
