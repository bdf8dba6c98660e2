"""Tests of emsedit_jax.data: loading, validation, splitting, teacher-forced encoding.

The real data sets are read from ../shared/data relative to the repository root
(see its README.md) and the tests that need them are skipped when it is absent.
Small malformed files and tokenizers are built inside the tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from emsedit_jax.errors import UserError
from emsedit_jax.data import (
    IGNORE,
    DataError,
    EditRequest,
    TeacherForced,
    check_lengths,
    detect_format,
    encode,
    load_requests,
    split_requests,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZSRE = "zsre/zsre_mend_train-1k.json"
CF_TRAIN = "counterfact/counterfact-train.json"
CF_VAL = "counterfact/counterfact-val.json"
CF_ROME = "counterfact/counterfact-rome-format-sample.json"
MQUAKE = "mquake/MQuAKE-hard.json"


def data_path(rel: str) -> Path:
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"shared data file {path} is absent (see ../shared/data/README.md)")
    return path


# Each real file is loaded once per module.
@pytest.fixture(scope="module")
def zsre():
    return load_requests(data_path(ZSRE), skip_invalid=True)


@pytest.fixture(scope="module")
def cf_train():
    return load_requests(data_path(CF_TRAIN))


@pytest.fixture(scope="module")
def cf_val():
    return load_requests(data_path(CF_VAL))


@pytest.fixture(scope="module")
def cf_rome():
    return load_requests(data_path(CF_ROME))


@pytest.fixture(scope="module")
def mquake():
    return load_requests(data_path(MQUAKE))


# --------------------------------------------------------------------------- #
# Tiny offline tokenizers
# --------------------------------------------------------------------------- #

WORDS = "the capital of france is new york paris london city big a what who".split()


def word_tokenizer(with_pad: bool = True):
    """WordLevel tokenizer on whitespace; adds [BOS] as its default special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[BOS]": 2, "[UNK]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    kwargs = dict(bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]")
    if with_pad:
        kwargs["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def wtok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    """Byte-level BPE (GPT-2 style: no special tokens added, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "Toko Yasuda, the guitar and the piano",
        "The mother tongue of Danielle Darrieux is French and English",
        "John Lennon performs on the guitar",
    ]
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def req(prompt, target_new, target_true=None, *, rephrase=None, loc=("a city", "london"), source="t#0"):
    return EditRequest(
        prompt=prompt,
        target_new=target_new,
        rephrase=rephrase or prompt,
        loc_prompt=loc[0],
        loc_answer=loc[1],
        target_true=target_true,
        source=source,
    )


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


ZSRE_OK = {
    "subject": "Paris",
    "src": "what is the capital of france",
    "rephrase": "the capital of france is what",
    "alt": "london",
    "answers": ["paris"],
    "loc": "nq question: who is big",
    "loc_ans": "new york",
}
FLAT_OK = {
    "case_id": 7,
    "prompt": "the capital of france is",
    "target_new": "london",
    "ground_truth": "paris",
    "subject": "france",
    "rephrase_prompt": "the big capital of france is",
    "locality_prompt": "the capital of new york is",
    "locality_ground_truth": "a city",
}


# --------------------------------------------------------------------------- #
# Real files
# --------------------------------------------------------------------------- #


def test_zsre_counts_and_record(zsre):
    # 1,000 records, two of which (534 and 723) have an empty `alt`.
    assert len(zsre.requests) == 998
    assert len(zsre.skipped) == 2
    assert len(zsre.requests) + len(zsre.skipped) == 1000
    assert "record 534" in zsre.skipped[0] and "'alt'" in zsre.skipped[0]
    assert "record 723" in zsre.skipped[1]
    r = zsre.requests[0]
    assert r.prompt == "What is the product made by UniFirst?"
    assert r.target_new == "unmanned aircraft"
    assert r.target_true == "uniform"
    assert r.rephrase == "What will be the product of UniFirst?"
    assert r.loc_prompt == "nq question: john goodman's character in the big lebowski"
    assert r.loc_answer == "Walter Sobchak"
    assert r.subject == "UniFirst"
    assert r.case_id is None and r.hop_questions == () and r.hop_answer is None
    assert r.source == "zsre_mend_train-1k.json#0"
    assert all(q.loc_prompt.startswith("nq question: ") for q in zsre.requests)
    # Record 174's `alt` is " Captain Universe" in the file: whitespace is stripped.
    r174 = next(q for q in zsre.requests if q.source.endswith("#174"))
    assert r174.target_new == "Captain Universe"


def test_zsre_default_raises_on_empty_alt():
    path = data_path(ZSRE)
    with pytest.raises(DataError) as e:
        load_requests(path)
    msg = str(e.value)
    assert path.name in msg and "record 534" in msg and "'alt'" in msg
    assert "1 more" in msg
    assert e.value.index == 534 and e.value.field == "alt"


def test_counterfact_flat(cf_train, cf_val):
    assert len(cf_train.requests) == 10000 and not cf_train.skipped
    assert len(cf_val.requests) == 1919 and not cf_val.skipped
    r = cf_train.requests[0]
    assert (r.case_id, r.prompt, r.target_new, r.target_true) == (2, "Toko Yasuda, the", "piano", "guitar")
    assert r.subject == "Toko Yasuda"
    assert r.rephrase == "Toko Yasuda is incredible at"
    assert (r.loc_prompt, r.loc_answer) == ("John Lennon performs on the", "guitar")
    assert r.source == "counterfact-train.json#0"
    last = cf_val.requests[-1]
    assert (last.case_id, last.target_new) == (21910, "guitar")
    assert last.prompt == "Gamal Abdel-Rahim performs on the"
    assert not {q.case_id for q in cf_train.requests} & {q.case_id for q in cf_val.requests}


def test_counterfact_rome_sample_matches_flat(cf_rome, cf_train):
    assert len(cf_rome.requests) == 7
    r = cf_rome.requests[0]
    assert r.case_id == 0
    assert r.prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.target_new, r.target_true, r.subject) == ("English", "French", "Danielle Darrieux")
    assert r.rephrase.startswith("Shayna does this and Yossel goes still and dies.")
    assert (r.loc_prompt, r.loc_answer) == ("The mother tongue of L\u00e9on Blum is", "French")
    # Case 2 is in both files; both formats give the same edit.
    rome2 = next(q for q in cf_rome.requests if q.case_id == 2)
    flat2 = next(q for q in cf_train.requests if q.case_id == 2)
    for name in ("prompt", "target_new", "target_true", "subject"):
        assert getattr(rome2, name) == getattr(flat2, name)


def test_mquake(mquake):
    raw = json.loads(data_path(MQUAKE).read_text(encoding="utf-8"))
    n_rewrites = sum(len(case["requested_rewrite"]) for case in raw)
    assert len(raw) == 429 and n_rewrites == 1716
    assert len(mquake.requests) == n_rewrites and not mquake.skipped
    first = mquake.requests[:4]
    assert {q.case_id for q in first} == {7417}
    assert [q.prompt for q in first] == [
        "Hey Jude was performed by",
        "The director of Madonna is",
        "Narendra Modi is a citizen of",
        "The official language of Australia is",
    ]
    assert [q.target_new for q in first] == ["Madonna", "Narendra Modi", "Australia", "Arabic"]
    assert [q.target_true for q in first] == ["The Beatles", "Guy Oseary", "India", "English"]
    assert first[0].rephrase == "Who performed Hey Jude?"
    assert first[0].subject == "Hey Jude"
    assert first[0].hop_answer == "Arabic"
    assert first[0].hop_questions == tuple(raw[0]["questions"]) and len(first[0].hop_questions) == 3
    assert all(q.hop_questions == () and q.hop_answer is None for q in first[1:])
    assert first[2].source == "MQuAKE-hard.json#0/requested_rewrite[2]"
    # Every case: one hop-question carrier, a shared case id.
    assert sum(bool(q.hop_questions) for q in mquake.requests) == 429
    assert len({q.case_id for q in mquake.requests}) == 429
    # Locality: an original single-hop fact that no case of the file edits.
    hop_facts = {(h["cloze"], h["answer"]) for case in raw for h in case["single_hops"]}
    edited = {(t[0], t[1]) for case in raw for t in case["orig"]["edit_triples"]}
    fact_key = {
        (h["cloze"], h["answer"]): (t[0], t[1])
        for case in raw
        for h, t in zip(case["single_hops"], case["orig"]["triples"])
    }
    edit_prompts = {q.prompt for q in mquake.requests}
    for q in mquake.requests:
        assert (q.loc_prompt, q.loc_answer) in hop_facts
        assert fact_key[(q.loc_prompt, q.loc_answer)] not in edited
        assert q.loc_prompt not in edit_prompts
        assert q.loc_answer != q.target_new
    # `limit` counts cases and does not change the locality probes.
    head = load_requests(data_path(MQUAKE), limit=3)
    assert head.requests == mquake.requests[:12]


@pytest.mark.parametrize(
    "rel,fmt",
    [(ZSRE, "zsre"), (CF_VAL, "counterfact"), (CF_ROME, "counterfact_rome"), (MQUAKE, "mquake")],
)
def test_auto_detection(rel, fmt):
    path = data_path(rel)
    first = json.loads(path.read_text(encoding="utf-8"))[0]
    assert detect_format(first) == fmt
    explicit = load_requests(path, fmt, limit=5, skip_invalid=True)
    auto = load_requests(path, limit=5, skip_invalid=True)
    assert explicit.requests == auto.requests and len(auto.requests) > 0


def test_user_format_accepts_standard_field_names():
    assert load_requests(data_path(CF_VAL), "user", limit=3).requests == load_requests(
        data_path(CF_VAL), limit=3
    ).requests
    assert load_requests(data_path(ZSRE), "user", limit=3).requests[0].target_new == "unmanned aircraft"
    with pytest.raises(DataError, match="cannot detect"):
        load_requests(data_path(CF_ROME), "user")


# --------------------------------------------------------------------------- #
# User files written here
# --------------------------------------------------------------------------- #


def test_user_jsonl(tmp_path):
    second = dict(FLAT_OK, case_id="x2", target_new="new york")
    del second["ground_truth"]  # the true target is optional in user files
    path = write_jsonl(tmp_path / "edits.jsonl", [FLAT_OK, second])
    res = load_requests(path, "user")
    assert [r.case_id for r in res.requests] == [7, "x2"]
    r = res.requests[0]
    assert (r.prompt, r.target_new, r.target_true) == ("the capital of france is", "london", "paris")
    assert (r.loc_prompt, r.loc_answer) == ("the capital of new york is", "a city")
    assert r.source == "edits.jsonl#0"
    assert res.requests[1].target_true is None
    # The standard formats ("auto" detects them) insist on the true target.
    with pytest.raises(DataError, match="record 1.*'ground_truth'"):
        load_requests(path)
    full = write_jsonl(tmp_path / "full.jsonl", [FLAT_OK])
    assert load_requests(full).requests[0] == dataclasses.replace(r, source="full.jsonl#0")

    zpath = write_jsonl(tmp_path / "zsre_like.jsonl", [ZSRE_OK])
    z = load_requests(zpath, "user").requests[0]
    assert (z.prompt, z.target_new, z.target_true, z.loc_answer) == (
        "what is the capital of france",
        "london",
        "paris",
        "new york",
    )


MALFORMED = [
    ("missing_alt", lambda r: r.pop("alt"), "alt"),
    ("empty_target", lambda r: r.update(alt="   "), "alt"),
    ("wrong_type", lambda r: r.update(rephrase=5), "rephrase"),
    ("answers_not_list", lambda r: r.update(answers="paris"), "answers"),
]


@pytest.mark.parametrize("name,mutate,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_zsre_record(tmp_path, name, mutate, field):
    bad = dict(ZSRE_OK)
    mutate(bad)
    path = write_json(tmp_path / f"{name}.json", [ZSRE_OK, ZSRE_OK, bad, ZSRE_OK])
    with pytest.raises(DataError) as e:
        load_requests(path, "zsre")
    msg = str(e.value)
    assert path.name in msg and "record 2" in msg and f"'{field}'" in msg
    res = load_requests(path, "zsre", skip_invalid=True)
    assert len(res.requests) == 3 and len(res.skipped) == 1
    assert "record 2" in res.skipped[0] and f"'{field}'" in res.skipped[0]


def test_malformed_counterfact_names_case_id_and_counts(tmp_path):
    records = [dict(FLAT_OK, case_id=i) for i in range(6)]
    records[1]["target_new"] = ["london"]  # wrong type
    records[3]["prompt"] = ""  # empty prompt
    del records[4]["locality_prompt"]  # missing field
    path = write_json(tmp_path / "cf_bad.json", records)
    with pytest.raises(DataError) as e:
        load_requests(path)
    msg = str(e.value)
    assert "cf_bad.json" in msg and "record 1" in msg and "case_id=1" in msg and "'target_new'" in msg
    assert "2 more" in msg
    res = load_requests(path, skip_invalid=True)
    assert [r.case_id for r in res.requests] == [0, 2, 5]
    assert len(res.skipped) == 3
    assert "'prompt'" in res.skipped[1] and "'locality_prompt'" in res.skipped[2]


def test_malformed_rome_and_mquake(tmp_path):
    rome = json.loads(data_path(CF_ROME).read_text(encoding="utf-8"))[:3]
    rome[1]["requested_rewrite"]["target_new"]["str"] = " "
    path = write_json(tmp_path / "rome_bad.json", rome)
    expected = r"rome_bad\.json, record 1, case_id=1, field 'requested_rewrite\.target_new\.str'"
    with pytest.raises(DataError, match=expected):
        load_requests(path)
    assert len(load_requests(path, skip_invalid=True).requests) == 2

    mq = json.loads(data_path(MQUAKE).read_text(encoding="utf-8"))[:3]
    del mq[2]["requested_rewrite"][1]["subject"]
    path = write_json(tmp_path / "mq_bad.json", mq)
    with pytest.raises(DataError, match=r"mq_bad\.json, record 2.*'requested_rewrite\[1\]\.subject'"):
        load_requests(path)
    res = load_requests(path, skip_invalid=True)  # the whole case is skipped
    assert len(res.requests) == 8 and len(res.skipped) == 1


def test_invalid_json_and_bad_format(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(FLAT_OK) + "\n" + '{"prompt": "x",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl.*line 2"):
        load_requests(path)
    odd = write_json(tmp_path / "odd.json", [{"foo": "bar"}])
    with pytest.raises(DataError, match=r"odd\.json.*cannot detect"):
        load_requests(odd)
    with pytest.raises(DataError, match=r"empty\.json: no records"):
        load_requests(write_json(tmp_path / "empty.json", []))
    with pytest.raises(UserError, match="unknown data format 'nonsense'"):
        load_requests(odd, "nonsense")


def _message(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_requests(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_files_each_get_their_message(tmp_path):
    """Non-UTF-8 bytes, a top-level object or scalar, a truncated file, a directory, a
    missing path: each a one-line DataError naming the file."""
    latin = tmp_path / "latin1.json"
    latin.write_bytes(json.dumps([FLAT_OK]).replace("paris", "Par\u00eds").encode("latin-1"))
    assert _message(latin) == f"{latin}: not UTF-8 text: byte 0xed at line 1 (byte offset {json.dumps([FLAT_OK]).index('paris') + 3}); save the file as UTF-8"
    obj = write_json(tmp_path / "obj.json", FLAT_OK)
    assert _message(obj) == (f"{obj}: the top level is a JSON object; expected a list of records: a JSON array "
                             "[{...}, {...}] or one object per line (JSON Lines, .jsonl)")
    assert _message(write_json(tmp_path / "num.json", 5)).endswith(
        "num.json: the top level is a JSON number; expected a JSON array of records")
    trunc = tmp_path / "trunc.json"
    trunc.write_text(json.dumps([FLAT_OK, FLAT_OK], indent=1)[:-40], encoding="utf-8")
    assert "trunc.json: truncated: the file ends at line" in _message(trunc)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "x",, }]', encoding="utf-8")
    assert _message(bad) == f"{bad}: invalid JSON at line 1 column 17: Expecting property name enclosed in double quotes"
    assert _message(tmp_path) == f"{tmp_path}: is a directory; expected a JSON or JSONL file of records"
    missing = tmp_path / "nope"  # no suffix, not org/name: never sent to the Hub
    assert _message(missing) == f"{missing}: no such file (a data set on the Hugging Face Hub is given as 'org/name')"
    assert _message("no/such/dir/file.json").startswith("no/such/dir/file.json: no such file")
    # Wrapped records and a byte-order mark are accepted.
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text("\ufeff" + json.dumps({"data": [FLAT_OK]}), encoding="utf-8")
    assert len(load_requests(wrapped).requests) == 1


def test_hub_ids_only_for_org_name(tmp_path, monkeypatch):
    from emsedit_jax.data.records import resolve_data_path
    assert resolve_data_path("org/name") is None  # the only shape sent to the Hub
    with pytest.raises(DataError, match="no such file"):
        resolve_data_path("org/name.json")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    write_json(tmp_path / "org" / "name", [FLAT_OK])  # a local path wins over a hub id
    assert resolve_data_path("org/name") == (tmp_path / "org" / "name").resolve()
    assert len(load_requests("org/name").requests) == 1
    with pytest.raises(DataError, match=r"^org/typo: no such file"):  # a path into a local folder
        resolve_data_path("org/typo")
    # Offline (as the tests run) an unknown hub id is one message naming it.
    msg = _message("nosuch-org/nosuch-name")
    assert msg.startswith("nosuch-org/nosuch-name: no such local file, and loading it as a Hugging Face Hub data "
                          "set (split 'train') failed: ")


def test_null_and_non_object_records(tmp_path):
    """A JSON array with null records (pyarrow used to segfault on it) and a list as
    record 0: each is its own record's error; the other records are read as usual."""
    path = write_json(tmp_path / "nulls.json", [FLAT_OK, None, dict(FLAT_OK, case_id=8), None])
    assert _message(path) == (f"{path}, record 1: the record is null; expected a JSON object "
                              "(and 1 more invalid record(s); --skip-invalid (skip_invalid=True) skips them)")
    res = load_requests(path, skip_invalid=True)
    assert [r.case_id for r in res.requests] == [7, 8]
    assert res.skipped == [f"{path}, record 1: the record is null; expected a JSON object",
                           f"{path}, record 3: the record is null; expected a JSON object"]
    first_list = write_json(tmp_path / "list0.json", [["a", "b"], FLAT_OK, FLAT_OK])
    assert _message(first_list) == f"{first_list}, record 0: the record is an array; expected a JSON object"
    assert len(load_requests(first_list, skip_invalid=True).requests) == 2
    only_null = write_json(tmp_path / "only_null.json", [None])
    assert _message(only_null) == f"{only_null}, record 0: no record is a JSON object (record 0 is null)"


def test_one_wrong_type_changes_no_other_record(tmp_path):
    """One integer `alt` (Arrow once turned the column into ints, so string targets like
    "1997" arrived as ints and 89 valid records were dropped): only that record fails."""
    raw = json.loads(data_path(ZSRE).read_text(encoding="utf-8"))
    raw[5]["alt"] = 1997
    raw[6]["alt"] = "1997"
    raw[7]["loc_ans"] = 12
    path = write_json(tmp_path / "zsre_int_alt.json", raw)
    assert _message(path).startswith(f"{path}, record 5, field 'alt': expected a string, got number 1997 "
                                     "(and 3 more invalid record(s)")
    res = load_requests(path, skip_invalid=True)
    assert len(res.requests) == 996 and len(res.skipped) == 4  # records 5, 7 and the two empty alts
    assert "record 7, field 'loc_ans': expected a string, got number 12" in res.skipped[1]
    assert next(r for r in res.requests if r.source.endswith("#6")).target_new == "1997"
    assert res.requests[0].target_new == "unmanned aircraft"


def test_jsonl_bad_lines(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text(json.dumps(FLAT_OK) + "\n\n" + '{"prompt": "x",,}\n' + json.dumps(dict(FLAT_OK, case_id=9))
                    + "\n" + '{"prompt": "the capital', encoding="utf-8")
    msg = _message(path)
    assert msg.startswith(f"{path}, record 1 (line 3): invalid JSON at column 16: Expecting property name")
    assert "1 more invalid record(s)" in msg
    res = load_requests(path, skip_invalid=True)
    assert [r.case_id for r in res.requests] == [7, 9]
    assert res.skipped[1] == f"{path}, record 3 (line 5): truncated: the file ends inside this record"
    # A wrong field on a JSONL line names the line too.
    array = tmp_path / "array.jsonl"                 # a JSON array under a .jsonl name
    array.write_text(json.dumps([FLAT_OK, FLAT_OK], indent=1), encoding="utf-8")
    assert len(load_requests(array).requests) == 2
    typed = write_jsonl(tmp_path / "typed.jsonl", [FLAT_OK, dict(FLAT_OK, target_new=["x"])])
    assert _message(typed) == f"{typed}, record 1 (line 2), case_id=7, field 'target_new': expected a string, got array [\"x\"]"


def test_duplicates_and_file_identity(tmp_path):
    from emsedit_jax.data.records import file_sha256, request_hash
    path = write_json(tmp_path / "dups.json", [FLAT_OK, dict(FLAT_OK, case_id=8), FLAT_OK])
    res = load_requests(path)
    assert len(res.requests) == 3 and res.duplicates == ["dups.json#2 repeats dups.json#0"]
    assert res.path == str(path.resolve()) and res.sha256 == file_sha256(path) and res.n_records == 3
    assert request_hash(res.requests[0]) == request_hash(res.requests[2]) != request_hash(res.requests[1])


def test_over_long_prompt(tmp_path, wtok):
    long_prompt = " ".join(["the big city"] * 30)  # 90 words + BOS
    records = [FLAT_OK, dict(FLAT_OK, case_id=8, prompt=long_prompt), dict(FLAT_OK, case_id=9)]
    path = write_json(tmp_path / "long.json", records)
    reqs = load_requests(path).requests  # loading does not know the tokenizer
    with pytest.raises(DataError) as e:
        check_lengths(wtok, reqs, max_len=64)
    msg = str(e.value)
    assert "long.json#1" in msg and "case_id=8" in msg and "prompt" in msg and "91 tokens" in msg
    res = check_lengths(wtok, reqs, max_len=64, skip_invalid=True)
    assert [r.case_id for r in res.requests] == [7, 9] and len(res.skipped) == 1
    assert "long.json#1" in res.skipped[0]
    assert check_lengths(wtok, reqs, max_len=128).requests == reqs
    # encode() refuses a sequence longer than its largest bucket.
    with pytest.raises(DataError, match=r"long\.json#1.*prompt"):
        encode(wtok, reqs, "edit", length_buckets=(16, 32, 64))


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


def test_split_requests(cf_val, mquake):
    reqs = cf_val.requests
    a_train, a_test = split_requests(reqs, 1000, 500, seed=3)
    b_train, b_test = split_requests(reqs, 1000, 500, seed=3)
    assert a_train == b_train and a_test == b_test
    assert len(a_train) == 1000 and len(a_test) == 500
    train_ids = {r.case_id for r in a_train}
    assert len(train_ids) == 1000 and not train_ids & {r.case_id for r in a_test}
    c_train, _ = split_requests(reqs, 1000, 500, seed=4)
    assert c_train != a_train
    # Same permutation as numpy's generator.
    perm = np.random.default_rng(3).permutation(len(reqs))
    assert a_train[0] == reqs[perm[0]]
    with pytest.raises(ValueError, match="not enough"):
        split_requests(reqs, 1900, 20, seed=0)
    # by_case keeps the rewrites of an MQuAKE case together.
    m_train, m_test = split_requests(mquake.requests, 300, 100, seed=0, by_case=True)
    assert len(m_train) == 1200 and len(m_test) == 400
    assert not {r.case_id for r in m_train} & {r.case_id for r in m_test}
    assert sum(bool(r.hop_questions) for r in m_train) == 300


# --------------------------------------------------------------------------- #
# Teacher-forced encoding
# --------------------------------------------------------------------------- #


def test_encode_hand_computed(wtok):
    # vocab: [PAD]0 [EOS]1 [BOS]2 [UNK]3 the4 capital5 of6 france7 is8 new9 york10
    #        paris11 london12 city13 big14 a15 what16 who17
    r0 = req("the capital of france is", "new york", "paris", loc=("a big city is", "london"))
    r1 = req("what is", "paris", "new york", rephrase="who is", loc=("the city", "new york"))
    tf = encode(wtok, [r0, r1], "edit")
    assert isinstance(tf, TeacherForced)
    assert tf.input_ids.shape == (2, 16) and tf.input_ids.dtype == np.int32
    for arr in (tf.attention_mask, tf.labels, tf.alt_labels):
        assert arr.shape == (2, 16) and arr.dtype == np.int32
    X = IGNORE
    # r0: prompt [2,4,5,6,7,8], target [9,10], other target [11]
    assert tf.input_ids[0].tolist() == [2, 4, 5, 6, 7, 8, 9] + [0] * 9
    assert tf.attention_mask[0].tolist() == [1] * 7 + [0] * 9
    assert tf.labels[0].tolist() == [X] * 5 + [9, 10] + [X] * 9
    assert tf.alt_labels[0].tolist() == [X] * 5 + [11, X] + [X] * 9
    # r1: prompt [2,16,8], target [11], other target [9,10] (only one answer position)
    assert tf.input_ids[1].tolist() == [2, 16, 8] + [0] * 13
    assert tf.attention_mask[1].tolist() == [1] * 3 + [0] * 13
    assert tf.labels[1].tolist() == [X, X, 11] + [X] * 13
    assert tf.alt_labels[1].tolist() == [X, X, 9] + [X] * 13
    assert tf.n_answer == 2
    assert tf.answer_start.tolist() == [5, 2] and tf.answer_len.tolist() == [2, 1]
    assert len(tf) == 2 and tf.seq_len == 16

    reph = encode(wtok, [r0, r1], "rephrase")
    assert reph.input_ids[1].tolist()[:3] == [2, 17, 8] and reph.labels[1, 2] == 11

    loc = encode(wtok, [r0, r1], "loc")  # (loc_prompt, loc_answer, target_new)
    assert loc.input_ids[0].tolist()[:5] == [2, 15, 14, 13, 8]
    assert loc.labels[0].tolist()[:6] == [X, X, X, X, 12, X]
    assert loc.alt_labels[0].tolist()[:6] == [X, X, X, X, 9, X]
    assert loc.input_ids[1].tolist()[:4] == [2, 4, 13, 9]
    assert loc.labels[1].tolist()[:5] == [X, X, 9, 10, X]
    assert loc.alt_labels[1].tolist()[:5] == [X, X, 11, X, X]


def test_encode_buckets_and_padding(wtok):
    short = req("the city is", "paris", None)
    tf = encode(wtok, [short], "edit")
    assert tf.input_ids.shape == (1, 16) and tf.n_answer == 2
    assert (tf.alt_labels == IGNORE).all()  # no target_true
    long_prompt = " ".join(["the"] * 20)  # 21 tokens with BOS -> 21 + 3 - 1 = 23
    tf = encode(wtok, [short, req(long_prompt, "new york city", "paris")], "edit")
    assert tf.input_ids.shape == (2, 32) and tf.n_answer == 4
    assert tf.attention_mask.sum(axis=1).tolist() == [4, 23]
    tf = encode(wtok, [short], "edit", length_buckets=(8, 4), answer_buckets=(1,))
    assert tf.input_ids.shape == (1, 4) and tf.n_answer == 1
    # A target longer than the largest answer bucket rounds up to a multiple of it.
    tf = encode(wtok, [req("the", " ".join(["big"] * 5), None)], "edit", answer_buckets=(2,))
    assert tf.n_answer == 6
    # Without a pad token, rows are padded with eos.
    tf = encode(word_tokenizer(with_pad=False), [short], "edit")
    assert tf.input_ids[0].tolist() == [2, 4, 13, 8] + [1] * 12
    with pytest.raises(ValueError):
        encode(wtok, [short], "prompt")


def test_encode_real_requests_with_bpe(cf_train, bpe_tok):
    reqs = cf_train.requests[:64]
    assert check_lengths(bpe_tok, reqs, max_len=256).requests == reqs
    for field, (p_attr, t_attr, a_attr) in {
        "edit": ("prompt", "target_new", "target_true"),
        "rephrase": ("rephrase", "target_new", "target_true"),
        "loc": ("loc_prompt", "loc_answer", "target_new"),
    }.items():
        tf = encode(bpe_tok, reqs, field)
        assert tf.seq_len in (16, 32, 48, 64, 96, 128, 256)
        lengths = []
        for i, r in enumerate(reqs):
            p = bpe_tok(getattr(r, p_attr))["input_ids"]
            t = bpe_tok(" " + getattr(r, t_attr), add_special_tokens=False)["input_ids"]
            a = bpe_tok(" " + getattr(r, a_attr), add_special_tokens=False)["input_ids"]
            n = len(p) + len(t) - 1
            lengths.append(n)
            assert tf.input_ids[i, :n].tolist() == p + t[:-1]
            assert (tf.input_ids[i, n:] == bpe_tok.eos_token_id).all()
            assert tf.attention_mask[i].sum() == n
            assert tf.labels[i, len(p) - 1 : n].tolist() == t
            assert (tf.labels[i, : len(p) - 1] == IGNORE).all() and (tf.labels[i, n:] == IGNORE).all()
            k = min(len(a), len(t))
            assert tf.alt_labels[i, len(p) - 1 : len(p) - 1 + k].tolist() == a[:k]
            assert ((tf.labels[i] != IGNORE).sum()) == len(t) <= tf.n_answer
        assert tf.seq_len == min(b for b in (16, 32, 48, 64, 96, 128, 256) if b >= max(lengths))
        assert tf.n_answer == min(b for b in (2, 4, 8, 16, 32) if b >= int(tf.answer_len.max()))


@pytest.mark.parametrize("prompt,subject,ends_with,next_starts", [
    ("Toko Yasuda, the", "Toko Yasuda", "Yasuda", ","),                              # at the start
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "Darrieux", " is"),   # middle
    ("The mother tongue of Danielle Darrieux is", " Danielle Darrieux ", "Darrieux", " is"),  # spaces around
    ("The mother tongue of danielle darrieux is", "Danielle Darrieux", "darrieux", " is"),  # other case
    ("John Lennon performs on the guitar", "guitar", "guitar", None),                  # at the end
])
def test_subject_last_token_bpe(bpe_tok, prompt, subject, ends_with, next_starts):
    """The subject's last token: the prompt's tokens up to it decode to text ending with
    the subject, the next token starts right after it."""
    from emsedit_jax.data import subject_last_token
    ids = bpe_tok(prompt)["input_ids"]
    pos = subject_last_token(bpe_tok, prompt, subject)
    assert bpe_tok.decode(ids[:pos + 1]).endswith(ends_with)
    if next_starts is None:
        assert pos == len(ids) - 1
    else:
        assert bpe_tok.decode(ids[pos + 1:]).startswith(next_starts)


def test_subject_last_token_word_tokenizer_and_absent(wtok):
    """With a [BOS] token the index counts it; a subject not in the prompt (or none) is -1."""
    from emsedit_jax.data import subject_last_token
    assert subject_last_token(wtok, "the capital of france is", "france") == 4      # [BOS] the capital of france
    assert subject_last_token(wtok, "the capital of france is", "the capital") == 2
    assert subject_last_token(wtok, "the capital of france is", "london") == -1
    assert subject_last_token(wtok, "the capital of france is", None) == -1
    assert subject_last_token(wtok, "the capital of france is", "  ") == -1


def test_packed_subject_marks_and_key_slots(wtok):
    """Packed rows mark each request's subject token, or its answer positions when its
    prompt has no subject; key_slots finds them ("subject"), or them and the answer
    positions ("both"), or the answer positions alone ("answer")."""
    import jax.numpy as jnp

    from emsedit_jax.editor.capture import key_slots
    from emsedit_jax.pipeline import encode_split
    reqs = [EditRequest(prompt="the capital of france is", target_new="london", rephrase="what is",
                        loc_prompt="a city", loc_answer="paris", subject="france", source="t#0"),
            EditRequest(prompt="what city is big", target_new="new york", rephrase="what is", loc_prompt="a city",
                        loc_answer="paris", subject="paris", source="t#1")]       # subject absent
    split = encode_split(wtok, reqs)
    layout = split.layout([[0, 1]])
    batch, _ = split.pack("edit", [0, 1], layout.edit)
    assert layout.edit.n_rows == 1
    # row: [BOS] the capital of france is london | [BOS] what city is big new york
    # positions 0-5 (request 0: subject "france" at 4, answer slot 5), 7-12 (request 1: answers 10, 11)
    np.testing.assert_array_equal(np.nonzero(batch.subject[0])[0], [4, 10, 11])
    b = type(batch)(*(jnp.asarray(a) for a in batch))
    n = layout.edit.n_answer
    for mode, want in (("answer", [5, 10, 11]), ("subject", [4, 10, 11]), ("both", [4, 5, 10, 11])):
        pos, mask = key_slots(b, mode, n)
        assert pos.shape[1] == (2 * n if mode == "both" else n)
        np.testing.assert_array_equal(np.asarray(pos[0])[np.asarray(mask[0])], want)


def test_row_shape_packs_the_fewest_positions_and_every_batch_fits():
    """The packed rows' length is the one with the fewest positions + answer slots over
    the batches (not the cap filled row by row), and every batch fits it."""
    from emsedit_jax.pipeline import _assign_rows, row_shape
    # 30 sequences of 20 tokens: 600 tokens, just over a 512 cap. Filling rows of 512
    # takes 2 x 512 positions; two rows of 304 (15 sequences each) hold them.
    assert row_shape([(np.full(30, 20), np.full(30, 3))], 512) == (2, 304, 48)
    assert row_shape([(np.full(10, 20), np.full(10, 3))], 512) == (1, 208, 32)       # one row, as before
    rng = np.random.default_rng(0)
    for _ in range(20):
        batches = [(rng.integers(5, 60, n), rng.integers(1, 6, n)) for n in rng.integers(5, 40, 4)]
        cap = int(rng.choice([64, 128, 512]))
        n_rows, row_len, n_answer = row_shape(batches, cap)
        assert row_len % 16 == 0 and row_len <= max(cap, max(int(b[0].max()) for b in batches) + 15)
        for lengths, answers in batches:
            assign = _assign_rows(lengths, row_len)
            assert assign[-1] < n_rows and np.bincount(assign, weights=answers).max() <= n_answer
        # no worse than the rows filled up to the cap
        full = max(16, min(-(-max(int(b[0].sum()) for b in batches) // 16) * 16, -(-cap // 16) * 16))
        full = max(full, max(-(-int(b[0].max()) // 16) * 16 for b in batches))
        full_rows = max(_assign_rows(b[0], full)[-1] + 1 for b in batches)
        full_answer = max(int(np.bincount(_assign_rows(b[0], full), weights=b[1]).max()) for b in batches)
        assert n_rows * (row_len + n_answer) <= full_rows * (full + -(-full_answer // 8) * 8)
