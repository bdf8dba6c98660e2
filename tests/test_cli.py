"""The command line end to end on the tiny model: train -> evaluate -> edit, the
results.json schema, the saved edited checkpoint, and bad data stopping the run
before any work with the file, record and field named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import synthetic_requests
from emsedit_jax.cli import default_modules, main, parse_modules
from emsedit_jax.data import DataError
from emsedit_jax.errors import ConfigError, UserError
from emsedit_jax.models import ModelConfig, get_kernel, load_model


def write_user_file(path, requests):
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps({"prompt": r.prompt, "target_new": r.target_new, "ground_truth": r.target_true,
                                "rephrase_prompt": r.rephrase, "locality_prompt": r.loc_prompt,
                                "locality_ground_truth": r.loc_answer, "subject": "x", "case_id": r.case_id}) + "\n")
    return path


def test_cli_train_evaluate_edit(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = write_user_file(tmp_path / "edits.jsonl", synthetic_requests(40, seed=5))
    common = ["--model", str(tiny_model_dir), "--dataset", "user", "--data", "edits.jsonl", "--n-train", "24",
              "--n-test", "16", "--quiet"]
    monkeypatch.chdir(tmp_path)         # the data path is relative to the training's directory
    train_args = ["train", *common, "--out", str(tmp_path / "run"), "--epochs", "2", "--n-edits", "4", "--num-seq",
                  "2", "--rank", "8", "--blocks", "1", "--lr-init", "0.1", "--meta-lr", "1e-3", "--steps", "2"]
    main(train_args)
    assert (tmp_path / "run" / "editor" / "editor.json").is_file()
    # A rerun into the finished folder that differs in anything is refused, naming what,
    # before the model loads.
    editor_json = (tmp_path / "run" / "editor" / "editor.json").read_text()
    for extra, diff in ((["--dtype", "bfloat16"], "dtype"), (["--split-seed", "3"], "split.split_seed")):
        with pytest.raises(UserError, match=rf"run holds another training run \(it differs in {diff}\); use"):
            main(train_args + extra)
    assert (tmp_path / "run" / "editor" / "editor.json").read_text() == editor_json
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = main(["evaluate", "--editor", str(tmp_path / "run" / "editor"), "--num-seq", "2", "--n-edits", "4",
                "--out", str(tmp_path / "results.json"), "--plot", str(tmp_path / "curve.png"), "--quiet",
                "--per-request", str(tmp_path / "per_request.jsonl")])
    saved = json.loads((tmp_path / "results.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "per_request.jsonl").read_text().splitlines()]
    assert [(x["batch"], x["position"]) for x in lines] == [(i // 4, i % 4) for i in range(8)]
    assert sum(x["edited"]["ES"] for x in lines) / 8 == pytest.approx(saved["metrics"]["ES"])
    assert saved["chat_template"] is False and saved["config"]["model"]["chat_template"] is False
    assert set(saved) >= {"metrics", "baseline", "timing", "config", "n_requests"}
    assert set(saved["metrics"]) == set(saved["baseline"]) == {"ES", "GS", "LS"}
    assert saved["n_requests"] == 8 and saved["config"]["data"]["data"] == str(data)  # split taken from the editor
    # Without split flags evaluate uses the requests the editor was not trained on.
    assert saved["config"]["data"]["split_seed"] == 0 and saved["same_file_as_training"]
    assert saved["train_overlap"] == 0 and saved["left_out_as_trained"] == 0
    assert saved["data_files"]["data"]["sha256"] == json.loads(
        (tmp_path / "run" / "editor" / "editor.json").read_text())["data_sha256"]
    # Scoring requests the editor was trained on is refused (before any editing).
    with pytest.raises(UserError, match=r"^24 of the 40 test requests were used to train the editor .*run/editor "
                       r"\(first: edits\.jsonl#\d+\); evaluate on other requests, or pass --allow-train-overlap"):
        main(["evaluate", "--editor", str(tmp_path / "run" / "editor"), "--dataset", "user", "--data", str(data),
              "--test-data", str(data), "--quiet"])
    assert saved["timing"]["train_seconds_per_edit"] > 0 and saved["timing"]["edit_seconds_per_edit"] > 0
    assert (tmp_path / "curve.png").stat().st_size > 0 and len(out["curve"]) == 2
    # `train --evaluate` (here on the finished run: no further training) evaluates the
    # protocol it trained, in the same process, loading the model once: the same scores.
    import emsedit_jax.api as api
    import emsedit_jax.cli as cli
    loads = []
    monkeypatch.setattr(cli, "_LAST_MODEL", [])         # forget the model the commands above loaded
    real = api.load_model
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.chdir(tmp_path)
    both = main(train_args + ["--evaluate"])
    assert len(loads) == 1 and both["evaluation"]["n_requests"] == 8
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"] == saved["metrics"]
    assert both["evaluation"]["baseline"] == saved["baseline"]
    monkeypatch.chdir(tmp_path / "elsewhere")
    printed = capsys.readouterr().out
    assert "| unedited |" in printed and "configuration:" in printed
    # The default solve has the key memory and the locality prior, whose C0 the editor
    # keeps from training; the paper's solve is one flag away, and another C0 source is
    # estimated again from the 24 training requests.
    ev = ["evaluate", "--editor", str(tmp_path / "run" / "editor"), "--num-seq", "2", "--n-edits", "4", "--quiet"]
    assert (saved["editor"]["key_memory"], saved["editor"]["loc_prior"], saved["prior_from_editor"]) == (1.0, 100.0, True)
    assert saved["timing"]["loc_prior_seconds"] is None
    with pytest.raises(ConfigError, match="needs --key-memory"):
        main([*ev, "--key-memory", "0", "--loc-prior", "3"])
    paper = main([*ev, "--key-memory", "0"])
    assert (paper["editor"]["key_memory"], paper["editor"]["loc_prior"], paper["prior_from_editor"]) == (0, 0, False)
    assert paper["metrics"] != saved["metrics"] and paper["baseline"] == out["baseline"]
    wide = main([*ev, "--loc-prior", "3", "--prior-source", "wide"])
    assert wide["editor"]["loc_prior"] == 3.0 and wide["loc_prior_requests"] == 24
    assert wide["timing"]["loc_prior_seconds"] > 0 and wide["n_requests"] == 8

    res = main(["edit", "--editor", str(tmp_path / "run" / "editor"),     # --model: the editor's
                "--fact", "w1 w2 w3", "w4", "--save", str(tmp_path / "edited")])
    assert len(res["before"]) == 1
    edited = load_model(tmp_path / "edited", tokenizer=False)
    base = load_model(tiny_model_dir, tokenizer=False)
    k = "model.layers.3.mlp.up_proj"
    assert k in default_modules(base.config)
    diff = abs(get_kernel(edited.config, edited.params, k) - get_kernel(base.config, base.params, k)).max()
    assert float(diff) > 0
    with pytest.raises(ConfigError, match=r"--subject: 2 given for 1 --fact"):
        main(["edit", "--editor", str(tmp_path / "run" / "editor"), "--fact", "w1 w2 w3", "w4",
              "--subject", "w1", "--subject", "w2"])


def test_cli_bad_data_stops_before_work(tiny_model_dir, tmp_path):
    reqs = synthetic_requests(20, seed=6)
    data = write_user_file(tmp_path / "edits.jsonl", reqs)
    lines = data.read_text().splitlines()
    bad = json.loads(lines[7])
    bad["target_new"] = "   "
    lines[7] = json.dumps(bad)
    data.write_text("\n".join(lines) + "\n")
    args = ["train", "--model", str(tiny_model_dir), "--dataset", "user", "--data", str(data), "--n-train", "10",
            "--n-test", "9", "--out", str(tmp_path / "run"), "--quiet"]
    with pytest.raises(DataError, match=r"edits\.jsonl.*record 7.*target_new"):
        main(args)
    assert not (tmp_path / "run").exists()
    main(args[:-1] + ["--skip-invalid", "--epochs", "1", "--n-edits", "5", "--rank", "4", "--blocks", "1", "--quiet"])
    assert (tmp_path / "run" / "editor" / "editor.json").is_file()


def test_module_selection():
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=30, num_attention_heads=2))
    assert default_modules(cfg) == tuple(f"model.layers.{i}.mlp.up_proj" for i in range(21, 30))   # the last 30%
    llama32 = dataclasses.replace(cfg, num_layers=32)
    assert default_modules(llama32) == tuple(f"model.layers.{i}.mlp.up_proj" for i in range(22, 32))
    small = dataclasses.replace(cfg, num_layers=4)                                        # at least three
    assert default_modules(small) == tuple(f"model.layers.{i}.mlp.up_proj" for i in range(1, 4))
    # keys at the subject are read in the middle layers: 3-8 of 30 layers, and of GPT-J's 28 (MEMIT's)
    assert default_modules(cfg, "subject") == tuple(f"model.layers.{i}.mlp.up_proj" for i in range(3, 9))
    gptj = ModelConfig.from_hf(dict(model_type="gptj", vocab_size=10, n_embd=8, n_layer=28, n_head=2, rotary_dim=2))
    assert default_modules(gptj, "subject") == tuple(f"transformer.h.{i}.mlp.fc_in" for i in range(3, 9))
    assert default_modules(gptj) == tuple(f"transformer.h.{i}.mlp.fc_in" for i in range(22, 28))
    gpt2 = ModelConfig.from_hf(dict(model_type="gpt2", vocab_size=10, n_embd=8, n_layer=12, n_head=2))
    assert default_modules(gpt2, "subject") == tuple(f"transformer.h.{i}.mlp.c_fc" for i in range(1, 4))
    one = ModelConfig.from_hf(dict(model_type="gpt2", vocab_size=10, n_embd=8, n_layer=1, n_head=2))
    assert default_modules(one, "subject") == default_modules(one) == ("transformer.h.0.mlp.c_fc",)
    assert parse_modules(None, "3-4", "mlp.down_proj", cfg) == ("model.layers.3.mlp.down_proj", "model.layers.4.mlp.down_proj")
    assert parse_modules("model.layers.1.self_attn.o_proj", None, None, cfg) == ("model.layers.1.self_attn.o_proj",)


def test_console_entry_exits_zero(tiny_model_dir, monkeypatch, capsys):
    """The installed script calls sys.exit(console()): it must return 0, not a dict."""
    from emsedit_jax.cli import console
    monkeypatch.setattr("sys.argv", ["emsedit-jax", "generate", "--model", str(tiny_model_dir), "--prompt", "w1 w2",
                                     "--max-new-tokens", "2"])
    assert console() == 0
    assert "'w1 w2' ->" in capsys.readouterr().out


def test_two_processes_train_bit_identical_editors(tiny_model_dir, tmp_path):
    """The same training command, run by two processes at once from different working
    directories (the data given by a relative path), writes the same editor bit for
    bit; the recorded data path is absolute."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import chex
    import jax
    import numpy as np

    from emsedit_jax.checkpoint import load_editor
    write_user_file(tmp_path / "edits.jsonl", synthetic_requests(12, seed=3))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "emsedit_jax.cli", "train", "--model", str(tiny_model_dir), "--dataset", "user",
           "--data", "../edits.jsonl", "--n-train", "8", "--n-test", "4", "--out", "run", "--n-edits", "4",
           "--num-seq", "2", "--layers", "3", "--rank", "4", "--blocks", "1", "--lr-init", "0.1", "--meta-lr", "1e-2",
           "--quiet"]
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        procs.append(subprocess.Popen(cmd, cwd=tmp_path / name, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    records = [json.loads((tmp_path / n / "run" / "editor" / "editor.json").read_text()) for n in "ab"]
    assert records[0]["state_sha256"] == records[1]["state_sha256"]
    assert records[0]["data"] == str((tmp_path / "edits.jsonl").resolve())
    model = load_model(tiny_model_dir, tokenizer=False)
    (_, a, _), (_, b, _) = (load_editor(tmp_path / n / "run" / "editor", model.config) for n in "ab")
    chex.assert_trees_all_equal((a.nets, a.stats), (b.nets, b.stats))
    moved = [float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(a.nets)]
    assert max(moved) > 0


def test_split_defaults_and_mquake_cases_stay_whole():
    """The split seed is 0 unless given; an MQuAKE case's rewrites land on one side."""
    import argparse
    from pathlib import Path

    from emsedit_jax.cli import _load_data
    mquake = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mquake" / "MQuAKE-hard.json"
    if not mquake.is_file():
        pytest.skip("../shared/data is absent")
    args = argparse.Namespace(dataset="mquake", data=str(mquake), test_data=None, n_train=100, n_test=50,
                              split_seed=None, skip_invalid=False)
    train, test, record = _load_data(args)
    assert record["split"] == {"n_train": 100, "n_test": 50, "split_seed": 0, "by_case": True}
    assert len({r.case_id for r in train}) == 100 and len({r.case_id for r in test}) == 50
    assert not {r.case_id for r in train} & {r.case_id for r in test}
    assert record["train_test_overlap"] == 0 and record["data"]["path"] == str(mquake.resolve())
    args.n_train = 400
    with pytest.raises(UserError, match=r"not enough cases: n_train \+ n_test \(--n-train, --n-test\) = 450 > 429"):
        _load_data(args)


def test_evaluate_loads_the_llm_in_the_dtype_the_editor_was_trained_in():
    """evaluate / edit / generate without --dtype take the editor's training dtypes
    (a residual stream dtype only where it differs from the one --dtype implies); a
    flag given wins; train and an editor-less command default to float32."""
    from emsedit_jax.cli import _editor_defaults, _model_dtypes, parse_args
    ev = ["evaluate", "--editor", "run/editor"]
    cases = [({"dtype": "bfloat16", "residual_dtype": "float32"}, [], ("bfloat16", None)),
             ({"dtype": "bfloat16", "residual_dtype": "bfloat16"}, [], ("bfloat16", "bfloat16")),
             ({"dtype": "float32", "residual_dtype": "float32"}, [], ("float32", None)),
             ({"dtype": "bfloat16", "residual_dtype": "float32"}, ["--dtype", "float32"], ("float32", None)),
             ({"dtype": "bfloat16", "residual_dtype": "bfloat16"}, ["--residual-dtype", "float32"],
              ("bfloat16", "float32")),
             ({}, [], ("float32", None))]
    for record, flags, want in cases:
        args = parse_args(ev + flags)
        _editor_defaults(args, {"editor": {}, **record})
        assert (args.dtype, args.residual_dtype) == want, (record, flags)
    args = parse_args(["train", "--dataset", "user", "--data", "x.jsonl", "--out", "run"])
    _model_dtypes(args)
    assert (args.dtype, args.residual_dtype) == ("float32", None)


def test_train_evaluate_passes_the_model_scale_and_run_flags_on():
    """`train --evaluate`'s evaluation parses to the training's dtypes, layout, mesh and
    run options, whether given or left at their defaults."""
    from emsedit_jax.cli import PASSED_ON, _passed_on, parse_args
    base = ["train", "--dataset", "user", "--data", "x.jsonl", "--out", "run"]
    for extra in ([], ["--dtype", "bfloat16", "--residual-dtype", "bfloat16", "--layer-layout", "stacked", "--mesh",
                       "1,2", "--sharding", "tp", "--remat", "--deterministic", "--quiet", "--no-compile-cache",
                       "--compile-cache-dir", "cache"]):
        args = parse_args(base + extra)
        ev = parse_args(["evaluate", "--editor", "run/editor", *_passed_on(args)])
        assert {n: getattr(ev, n) for n in PASSED_ON} == {n: getattr(args, n) for n in PASSED_ON}
    assert {n: getattr(args, n) for n in PASSED_ON} != {n: getattr(parse_args(base), n) for n in PASSED_ON}
