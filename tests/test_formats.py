"""Loaders of the evaluation's extra fields: ROME-format lists kept whole, portability in
both shapes, EasyEdit KnowEdit records (detected or named), and the message for a record
of unknown shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emsedit_jax.data import DataError, load_requests

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ROME = DATA / "counterfact" / "counterfact-rome-format-sample.json"

ZSRE_PORT = {"subject": "Epaspidoceras", "src": "Which family does Epaspidoceras belong to?", "alt": "Noctuidae",
             "answers": ["Aspidoceratidae"], "rephrase": "What family are Epaspidoceras?",
             "loc": "nq question: who wrote the hobbit", "loc_ans": "J. R. R. Tolkien",
             "portability": {"Recalled Relation": "(Noctuidae, common name, owlet moths)",
                             "New Question": "What is the common name of the family of Epaspidoceras?",
                             "New Answer": "owlet moths"}}
KNOWEDIT_ZSRE = {"subject": "Epaspidoceras", "target_new": "Noctuidae",
                 "prompt": "Which family does Epaspidoceras belong to?", "ground_truth": ["Aspidoceratidae"],
                 "rephrase_prompt": "What family are Epaspidoceras?",
                 "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is",
                                                        "ground_truth": ["genus"]},
                                                       {"prompt": "Epaspidoceras taxon rank",
                                                        "ground_truth": ["genus"]}]},
                 "portability": {"Reasoning": [{"prompt": "What is the common name for the family Epaspidoceras "
                                                          "belongs to?", "ground_truth": "Owlet moths"}]}}
KNOWEDIT_RECENT = {"subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
                   "portability": {
                       "Logical_Generalization": [{"prompt": "Is Leo Arons still alive?",
                                                   "ground_truth": [["no"], ["incorrect"]]}],
                       "Reasoning": [{"prompt": "The continent of the place of death of Leo Arons is",
                                      "ground_truth": [["Europe", "European continent"]]},
                                     {"prompt": "The head of government of the place of death of Leo Arons is",
                                      "ground_truth": [["Kai Wegner"]]}],
                       "Subject_Aliasing": [{"prompt": "The place of death of Martin Leo Arons is",
                                             "ground_truth": [["Berlin", "Berlin, Germany"]]}]},
                   "locality": {"Relation_Specificity": [{"prompt": "The name of the father of Leo Arons is",
                                                          "ground_truth": [["Albert Arons"]]}]}}


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@pytest.mark.skipif(not ROME.is_file(), reason="needs ../shared/data")
def test_rome_format_keeps_every_paraphrase_and_neighbour():
    raw = json.loads(ROME.read_text())
    reqs = load_requests(ROME).requests
    assert len(reqs) == len(raw)
    for r, x in zip(reqs, raw):
        assert r.paraphrases == tuple(p.strip() for p in x["paraphrase_prompts"]) and r.rephrase == r.paraphrases[0]
        assert r.neighbours == tuple(p.strip() for p in x["neighborhood_prompts"]) and r.loc_prompt == r.neighbours[0]
        assert r.generation_prompts == tuple(p.strip() for p in x["generation_prompts"])
        assert len(r.neighbours) == 10 and len(r.paraphrases) == 2


def test_portability_both_shapes(tmp_path):
    z = load_requests(write(tmp_path, "z.json", [ZSRE_PORT, {**ZSRE_PORT, "portability": None}])).requests
    assert z[0].portability == (("portability", "What is the common name of the family of Epaspidoceras?",
                                 "owlet moths"),)
    assert z[1].portability == ()
    k = load_requests(write(tmp_path, "k.json", [KNOWEDIT_RECENT])).requests[0]
    assert k.portability == (("Logical_Generalization", "Is Leo Arons still alive?", "no"),
                             ("Reasoning", "The continent of the place of death of Leo Arons is", "Europe"),
                             ("Reasoning", "The head of government of the place of death of Leo Arons is",
                              "Kai Wegner"),
                             ("Subject_Aliasing", "The place of death of Martin Leo Arons is", "Berlin"))
    bad = {**ZSRE_PORT, "portability": {"Reasoning": [{"prompt": "q", "ground_truth": 3}]}}
    with pytest.raises(DataError, match=r"record 0.*portability\.Reasoning\[0\]\.ground_truth.*number"):
        load_requests(write(tmp_path, "bad.json", [bad]))


@pytest.mark.parametrize("fmt", ["auto", "knowedit"])
def test_knowedit_records(tmp_path, fmt):
    flat_cf = {"prompt": "The name of the position held by Frederic Piesch is", "target_new": "Archbishop of Leon",
               "ground_truth": "mayor of Vienna", "subject": "Frederic Piesch",
               "locality_prompt": "The gender of Frederic Piesch is", "locality_ground_truth": "male",
               "paraphrase_prompt": "Frederic Piesch held the position of",
               "portability": {"Subject_Aliasing": [{"prompt": "The position held by Frederic of Pieschen is",
                                                     "ground_truth": "Archbishop of Leon"}]}}
    reqs = load_requests(write(tmp_path, "knowedit.json", [KNOWEDIT_ZSRE, KNOWEDIT_RECENT, flat_cf]), fmt).requests
    a, b, c = reqs
    assert (a.prompt, a.target_new, a.target_true, a.rephrase) == (
        KNOWEDIT_ZSRE["prompt"], "Noctuidae", "Aspidoceratidae", "What family are Epaspidoceras?")
    assert (a.loc_prompt, a.loc_answer) == ("The taxon rank of Epaspidoceras is", "genus")
    assert a.portability[0][0] == "Reasoning" and a.portability[0][2] == "Owlet moths"
    # Wiki_recent: no true target, no paraphrase (the prompt stands in), alias lists.
    assert b.target_true is None and b.rephrase == b.prompt and b.loc_answer == "Albert Arons"
    assert (c.rephrase, c.loc_prompt, c.loc_answer, c.target_true) == (
        "Frederic Piesch held the position of", "The gender of Frederic Piesch is", "male", "mayor of Vienna")
    no_loc = {k: v for k, v in KNOWEDIT_ZSRE.items() if k != "locality"}
    with pytest.raises(DataError, match="record 0.*field 'locality'.*missing"):
        load_requests(write(tmp_path, "noloc.json", [no_loc]), "knowedit")


def test_unknown_shape_names_expected_and_found_fields(tmp_path):
    path = write(tmp_path, "odd.json", [{"question": "q", "answer": "a", "new_answer": "b"}])
    with pytest.raises(DataError) as e:
        load_requests(path)
    msg = str(e.value)
    assert "['answer', 'new_answer', 'question']" in msg                     # found
    for expected in ("zsre: src, alt", "counterfact: prompt, target_new", "knowedit: prompt, target_new"):
        assert expected in msg
