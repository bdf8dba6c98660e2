"""The evaluation's extra scores on hand-made fixtures: n-gram entropy of a known string,
ROME's probability scores against log-probabilities computed with transformers'
PyTorch model, portability per kind, fluency of greedy generations, per-request lines
that average to the aggregate, and chat-template prompts."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from conftest import synthetic_requests
from emsedit_jax import metrics as M
from emsedit_jax.data import EditRequest, encode, prompt_ids
from emsedit_jax.editor.config import EditorConfig
from emsedit_jax.editor.steps import init_editor, zero_deltas
from emsedit_jax.errors import UserError
from emsedit_jax.evaluate import (build_probes, fluency_scores, generate, per_request_lines, run_protocol,
                                  score_requests)
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split

MODULES = ("model.layers.3.mlp.up_proj",)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir):
    import transformers
    return transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()


def torch_logp(torch_model, tok, prompt: str, target: str) -> float:
    """Sum of log P(target token | prompt, earlier target tokens) with transformers."""
    import torch
    p, t = tok(prompt)["input_ids"], tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = torch_model(torch.tensor([p + t])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(p) - 1 + k, tok_id] for k, tok_id in enumerate(t)))


def test_ngram_entropy_of_a_known_string():
    toks = M.words("A b, a B")              # -> a b , a b
    assert toks == ["a", "b", ",", "a", "b"]
    # bigrams (a b) x2, (b ,), (, a): H2 = -(1/2 log2 1/2 + 2 * 1/4 log2 1/4) = 1.5 bits;
    # trigrams all distinct (3): H3 = log2 3.
    assert M.ngram_entropy(toks, 2) == pytest.approx(1.5)
    assert M.ngram_entropy(toks, 3) == pytest.approx(math.log2(3))
    assert M.generation_entropy("A b, a B") == pytest.approx((2 / 3 * 1.5 + 4 / 3 * math.log2(3)) / 2)
    assert M.ngram_entropy(["x"], 2) == 0.0 and M.generation_entropy("x x x x x x") == 0.0
    assert M.summarise({"ES": np.array([1.0, np.nan, 0.0]), "fluency": np.array([2.0, 4.0, np.nan]),
                        "PS": np.array([np.nan])}) == {"ES": 50.0, "fluency": 3.0}


def cf_request(i: int = 0, **kw) -> EditRequest:
    base = dict(prompt="w1 w2 w3", target_new="w4 w5", target_true="w6", rephrase="w2 w1 w3",
                loc_prompt="w7 w8", loc_answer="w6", case_id=i, source=f"hand#{i}",
                paraphrases=("w2 w1 w3", "w3 w1 w2"), neighbours=("w7 w8", "w9 w10 w11", "w12"))
    return EditRequest(**(base | kw))


def test_probability_scores_equal_hand_computed(tiny, torch_model):
    """Unedited model, two requests (multi-token targets, 2 paraphrases, 3 neighbours):
    each score from whole-target log-probabilities computed with transformers."""
    reqs = [cf_request(0), cf_request(1, prompt="w20 w21", target_new="w22", target_true="w23 w24 w25",
                                      paraphrases=("w21 w20",), neighbours=("w30 w31", "w32"))]
    split = encode_split(tiny.tokenizer, reqs)
    probes = build_probes(tiny.tokenizer, reqs, prob_scores=True)
    deltas = zero_deltas(EditorConfig(key_memory=0.0, modules=MODULES), tiny.config)
    got = score_requests(tiny, split, [0, 1], deltas, "counterfact", probes=probes)
    tok = tiny.tokenizer
    for k, r in enumerate(reqs):
        def lp(prompt, target):
            return torch_logp(torch_model, tok, prompt, target)
        new, true = lp(r.prompt, r.target_new), lp(r.prompt, r.target_true)
        assert got["efficacy_score"][k] == float(new > true)
        assert got["efficacy_magnitude"][k] == pytest.approx(math.exp(new) - math.exp(true), abs=1e-6)
        pn = [lp(p, r.target_new) for p in r.paraphrases]
        pt = [lp(p, r.target_true) for p in r.paraphrases]
        assert got["paraphrase_score"][k] == pytest.approx(np.mean([a > b for a, b in zip(pn, pt)]))
        assert got["paraphrase_magnitude"][k] == pytest.approx(np.mean(np.exp(pn) - np.exp(pt)), abs=1e-6)
        nn = [lp(p, r.target_new) for p in r.neighbours]
        nt = [lp(p, r.target_true) for p in r.neighbours]
        assert got["neighborhood_score"][k] == pytest.approx(np.mean([b > a for a, b in zip(nn, nt)]))
        assert got["neighborhood_magnitude"][k] == pytest.approx(np.mean(np.exp(nt) - np.exp(nn)), abs=1e-6)
    # Without the fields (no true target, no portability) nothing extra is built or scored.
    plain = [dataclasses.replace(r, target_true=None) for r in reqs]
    assert build_probes(tok, plain, prob_scores=True) is None
    assert set(score_requests(tiny, encode_split(tok, plain), [0, 1], deltas, "zsre")) == {"ES", "GS", "LS"}


def test_an_edited_model_and_its_baseline_scored_in_one_pass_match_transformers(tiny, torch_model):
    """score_requests with (deltas, zero deltas), as the protocols score an edited model
    beside the unedited one: the layers below the edit run once for both. Each model's
    probability scores equal transformers' with the delta added to the PyTorch weight
    (and without), and its token accuracy (ES / GS / LS) equals the PyTorch argmax's."""
    import copy

    import torch
    reqs = [cf_request(0), cf_request(1, prompt="w20 w21", target_new="w22", target_true="w23 w24 w25",
                                      rephrase="w21 w20", paraphrases=("w21 w20",), neighbours=("w30 w31", "w32"))]
    split = encode_split(tiny.tokenizer, reqs)
    probes = build_probes(tiny.tokenizer, reqs, prob_scores=True)
    module = "model.layers.2.mlp.up_proj"
    zero = zero_deltas(EditorConfig(key_memory=0.0, modules=(module,)), tiny.config)
    delta = np.random.default_rng(0).normal(0.0, 0.5, zero[module].shape).astype(np.float32)   # (d_in, d_out)
    models = ({module: jax.numpy.asarray(delta)}, zero)
    edited, base = score_requests(tiny, split, [0, 1], models, "counterfact", probes=probes)
    accuracies = score_requests(tiny, split, [0, 1], models, "zsre")      # ES / GS / LS as token accuracy
    edited_torch = copy.deepcopy(torch_model)
    with torch.no_grad():
        edited_torch.model.layers[2].mlp.up_proj.weight += torch.from_numpy(delta.T)
    tok = tiny.tokenizer

    def accuracy(tm, prompt, target):
        p, t = tok(prompt)["input_ids"], tok(" " + target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            pred = tm(torch.tensor([p + t])).logits[0].argmax(-1)
        return float(np.mean([int(pred[len(p) - 1 + k]) == tid for k, tid in enumerate(t)]))

    for got, acc, tm in ((edited, accuracies[0], edited_torch), (base, accuracies[1], torch_model)):
        for k, r in enumerate(reqs):
            new, true = torch_logp(tm, tok, r.prompt, r.target_new), torch_logp(tm, tok, r.prompt, r.target_true)
            assert got["efficacy_magnitude"][k] == pytest.approx(math.exp(new) - math.exp(true), rel=1e-4, abs=1e-7)
            nt = [torch_logp(tm, tok, p, r.target_true) for p in r.neighbours]
            nn = [torch_logp(tm, tok, p, r.target_new) for p in r.neighbours]
            assert got["neighborhood_magnitude"][k] == pytest.approx(np.mean(np.exp(nt) - np.exp(nn)),
                                                                     rel=1e-4, abs=1e-7)
            assert acc["ES"][k] == pytest.approx(accuracy(tm, r.prompt, r.target_new))
            assert acc["GS"][k] == pytest.approx(accuracy(tm, r.rephrase, r.target_new))
    assert not np.allclose(edited["efficacy_magnitude"], base["efficacy_magnitude"])   # the delta changed them


def test_portability_per_kind_and_lines_add_up(tiny, tmp_path):
    """Sequential editing of 2 x 3 requests: some with portability items of two kinds,
    some without (they do not count); per-request lines average to the aggregates."""
    base = synthetic_requests(6, seed=7, ragged=True)
    port = {0: (("reasoning", "w40 w41", "w42 w43"), ("Subject_Aliasing", "w44", "w45")),
            3: (("reasoning", "w46 w47 w48", "w49"),), 4: (("Subject_Aliasing", "w50", "w51 w52"),)}
    reqs = [dataclasses.replace(r, portability=port.get(i, ())) for i, r in enumerate(base)]
    split = encode_split(tiny.tokenizer, reqs)
    cfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=8, n_blocks=1, lr_init=0.1)
    state = init_editor(cfg, tiny.config, jax.random.key(0))
    res = run_protocol(tiny, cfg, state, split, protocol="sequential", num_seq=2, n_edits=3, metric="counterfact",
                       progress=False, fluency_tokens=4)
    # Their locality prompts have answers of their own: no neighbourhood score.
    keys = {"ES", "GS", "LS", "efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
            "PS", "PS/reasoning", "PS/Subject_Aliasing", "fluency"}
    assert set(res.metrics) == set(res.baseline) == keys
    assert np.isnan(res.per_request["PS"][[1, 2, 5]]).all() and not np.isnan(res.per_request["PS"][[0, 3, 4]]).any()
    assert np.isnan(res.per_request["PS/reasoning"][4]) and np.isnan(res.per_request["PS/Subject_Aliasing"][3])
    # The unedited PS of request 0 is the token accuracy of its answers, computed apart.
    acc = []
    for _, q, a in port[0]:
        tf = encode(tiny.tokenizer, [EditRequest(q, a, q, q, a)], "edit")
        from emsedit_jax.models import logits as model_logits
        lg = np.asarray(model_logits(tiny.config, tiny.params, tf.input_ids, tf.attention_mask))[0]
        s, n = tf.answer_start[0], tf.answer_len[0]
        acc.append(np.mean(lg[s:s + n].argmax(-1) == tf.labels[0, s:s + n]))
    assert res.per_request_baseline["PS"][0] == pytest.approx(np.mean(acc))
    lines = per_request_lines(res, reqs)
    assert [(x["id"], x["batch"], x["position"]) for x in lines] == [(i, i // 3, i % 3) for i in range(6)]
    for side, agg in (("edited", res.metrics), ("unedited", res.baseline)):
        for k, v in agg.items():
            vals = [x[side][k] for x in lines if x[side][k] is not None]
            assert np.mean(vals) == pytest.approx(v), (side, k)
    assert lines[1]["edited"]["PS"] is None


def test_fluency_is_entropy_of_greedy_generation(tiny, torch_model):
    """Greedy continuations equal transformers' generate; fluency is their entropy."""
    import torch
    reqs = [cf_request(0, generation_prompts=("w1 w2", "w3 w4 w5 w6")), cf_request(1)]
    texts = generate(tiny, tiny.params, ["w1 w2", "w3 w4 w5 w6", "w1 w2 w3"], 4, chunk=2)
    tok = tiny.tokenizer
    for p, t in zip(["w1 w2", "w3 w4 w5 w6", "w1 w2 w3"], texts):
        ids = torch.tensor([tok(p)["input_ids"]])
        ref = torch_model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert t == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    got = fluency_scores(tiny, reqs, np.array([0, 1]), zero_deltas(EditorConfig(key_memory=0.0, modules=MODULES), tiny.config), 4)
    want0 = np.mean([M.generation_entropy(p + t) for p, t in zip(["w1 w2", "w3 w4 w5 w6"], texts[:2])])
    assert got[0] == pytest.approx(want0) and got[1] == pytest.approx(M.generation_entropy("w1 w2 w3" + texts[2]))


def test_chat_template_prompts(tiny, tiny_model_dir):
    tok = tiny.tokenizer
    r = cf_request(0)
    with pytest.raises(UserError, match="no chat template"):
        encode_split(tok, [r], chat_template=True)
    from emsedit_jax.cli import main
    with pytest.raises(UserError, match="--chat-template"):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "w1", "--chat-template"])
    tok = type(tok).from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    tok.chat_template = "{% for m in messages %}w100 {{ m['content'] }} w101{% endfor %} w102"
    assert prompt_ids(tok, ["w1 w2"], chat_template=True) == [tok("w100 w1 w2 w101 w102")["input_ids"]]
    split = encode_split(tok, [r], chat_template=True)
    tf = split.views["edit"]
    assert split.chat_template
    n = int(tf.attention_mask[0].sum())
    assert tok.decode(tf.input_ids[0, :n]) == "w100 w1 w2 w3 w101 w102 w4"
    assert list(tf.labels[0, tf.answer_start[0]:tf.answer_start[0] + 2]) == tok("w4 w5")["input_ids"]
