"""One set of defaults and one clear error: the CLI's flags are the option dataclasses'
fields (same defaults, shown in --help), --config reads back a run's printed options,
every value is checked before any work, and a mistake in the input ends with one line
and exit status 2 (no traceback)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emsedit_jax import cli
from emsedit_jax.editor.config import EditorConfig, default_modules
from emsedit_jax.errors import ConfigError, UserError
from emsedit_jax.evaluate import EvalConfig
from emsedit_jax.models import ModelConfig
from emsedit_jax.options import field_default
from emsedit_jax.train import PRESETS, TrainConfig, configs

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                                num_hidden_layers=30, num_attention_heads=2))
TRAIN = ["train", "--dataset", "demo", "--out", "unused"]


def test_cli_defaults_are_the_dataclass_defaults():
    """Every field with a flag parses to the dataclass default, and the configs the CLI
    builds equal the library's (`train.configs`) for the same preset."""
    for argv, classes in ((TRAIN, (TrainConfig, EditorConfig)), (["evaluate", "--editor", "e"], (EvalConfig,))):
        args = cli.parse_args(argv)
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.metadata.get("cli", True):
                    assert getattr(args, f.name) == field_default(f), (cls.__name__, f.name)
    for preset in PRESETS:
        args = cli.parse_args([*TRAIN, "--preset", preset])
        ecfg, tcfg = configs(preset=preset, model_cfg=TINY)
        assert cli.train_editor_config(args, TINY) == ecfg and cli.train_config(args) == tcfg
    assert configs(default_modules(TINY))[0] == configs(model_cfg=TINY)[0]


def test_dataset_presets():
    """CounterFact trains EMSEdit with its preset unless another is named: keys at the
    subject, layers 3-8 of 30, T = 6; the baselines and other datasets keep the defaults."""
    cf = ["train", "--dataset", "counterfact", "--data", "x.json", "--out", "unused"]
    args = cli.parse_args(cf)
    ecfg = cli.train_editor_config(args, TINY)
    assert args.preset == "counterfact" and ecfg == configs(preset="counterfact", model_cfg=TINY)[0]
    assert ecfg.key_positions == "subject" and ecfg.steps == 6 and ecfg.key_memory == 1 and ecfg.loc_prior == 20
    assert ecfg.modules == tuple(f"model.layers.{i}.mlp.up_proj" for i in range(3, 9))
    for argv in ([*cf, "--preset", "default"], [*cf, "--method", "malmen"], TRAIN):
        args = cli.parse_args(argv)
        ecfg = cli.train_editor_config(args, TINY)
        assert args.preset == "default" and ecfg.key_positions == "answer"
        assert ecfg.modules[0] == "model.layers.21.mlp.up_proj"
    batch = cli.train_editor_config(cli.parse_args([*cf, "--protocol", "batch"]), TINY)
    assert batch.key_positions == "subject" and batch.steps == 8          # a shared network keeps its T
    faithful = cli.parse_args([*TRAIN, "--preset", "faithful", "--lr-init", "0.01"])   # flags beat the preset
    assert (faithful.lr_init, faithful.beta, faithful.schedule, faithful.log_step_size) == (0.01, 0.5, "faithful", False)


def test_help_shows_every_default_from_the_dataclass(monkeypatch, capsys):
    parser = cli.build_parser()
    for name in cli.COMMANDS:             # (plan keeps its own flags: plan.add_arguments)
        for action in parser.commands[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and "(default: " in action.help, (name, action.option_strings)
    rank = next(f for f in dataclasses.fields(EditorConfig) if f.name == "rank")
    monkeypatch.setattr(rank, "default", 77)
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--help"])
    assert "(default: 77)" in " ".join(capsys.readouterr().out.split())
    assert cli.parse_args(TRAIN).rank == 77


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_printed_configuration_reads_back(tmp_path, suffix):
    import yaml
    args = cli.parse_args([*TRAIN, "--rank", "64", "--method", "malmen", "--modules", "a.b,c.d", "--no-log-step-size",
                           "--n-train", "30", "--mesh", "1,2"])
    printed = cli.resolved_options(args)
    assert printed["editor"]["rank"] == 64 and printed["train"]["epochs"] == 1 and "debug" not in printed["run"]
    file = tmp_path / f"options{suffix}"
    file.write_text(json.dumps(printed) if suffix == ".json" else yaml.safe_dump(printed))
    again = cli.parse_args(["train", "--config", str(file)])
    assert cli.resolved_options(again) == printed
    assert cli.parse_args(["train", "--config", str(file), "--rank", "8"]).rank == 8      # flags win
    with pytest.raises(ConfigError, match=r"--config .*none\.yaml: no such file"):
        cli.parse_args(["train", "--config", str(tmp_path / "none.yaml")])
    (tmp_path / "bad.yaml").write_text("rank: [1")
    with pytest.raises(ConfigError, match=r"--config .*bad\.yaml: not valid YAML: while parsing"):
        cli.parse_args(["train", "--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "zero.json").write_text(json.dumps({"command": "train", "editor": {"rank": 0}}))
    with pytest.raises(ConfigError, match=r"--config .*zero\.json: rank: expected a whole number > 0, got 0"):
        cli.parse_args(["train", "--config", str(tmp_path / "zero.json")])
    with pytest.raises(ConfigError, match=r"'ranks' is not an option of train"):
        file.write_text(json.dumps({**printed, "editor": {"ranks": 3}}))
        cli.parse_args(["train", "--config", str(file)])
    results = tmp_path / "results.json"                      # a results.json holds them under "config"
    results.write_text(json.dumps({"metrics": {}, "config": printed}))
    assert cli.parse_args(["train", "--config", str(results)]).modules == ("a.b", "c.d")


def test_library_configs_check_their_fields():
    with pytest.raises(ConfigError, match=r"TrainConfig.meta_lr: expected a finite number > 0, got nan"):
        TrainConfig(meta_lr=math.nan)
    with pytest.raises(ConfigError, match=r"EditorConfig.rank: expected a whole number > 0, got 0"):
        EditorConfig(modules=("m",), rank=0)
    with pytest.raises(ConfigError, match=r"EditorConfig.key_memory: expected a finite number >= 0"):
        EditorConfig(modules=("m",), key_memory=math.inf)
    with pytest.raises(ConfigError, match=r"EvalConfig.capture_chunk"):
        EvalConfig(capture_chunk=0)
    assert EditorConfig(modules=["m"], beta=1).beta == 1.0 and EditorConfig(modules=["m"]).modules == ("m",)


BAD_FLAGS = [
    (["--meta-lr", "nan"], "argument --meta-lr: expected a finite number > 0, got 'nan'"),
    (["--lr-init", "inf"], "argument --lr-init: expected a finite number > 0, got 'inf'"),
    (["--rank", "0"], "argument --rank: expected a whole number > 0, got '0'"),
    (["--rank", "-4"], "argument --rank: expected a whole number > 0, got '-4'"),
    (["--blocks", "0"], "argument --blocks: expected a whole number > 0, got '0'"),
    (["--buckets", "0"], "argument --buckets: expected a whole number > 0, got '0'"),
    (["--n-edits", "0"], "argument --n-edits: expected a whole number > 0, got '0'"),
    (["--epochs", "1.5"], "argument --epochs: expected a whole number > 0, got '1.5'"),
    (["--key-memory", "nan"], "argument --key-memory: expected a finite number >= 0 (or none), got 'nan'"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_numbers_stop_at_parse_time(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args([*TRAIN, *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_numbers_of_evaluate_and_generate(capsys):
    for argv, message in ((["evaluate", "--editor", "e", "--capture-chunk", "0"], "argument --capture-chunk"),
                          (["evaluate", "--editor", "e", "--key-memory", "nan"], "argument --key-memory"),
                          (["generate", "--prompt", "x", "--max-new-tokens", "-2"], "argument --max-new-tokens")):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_modules_and_paths_checked_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """--layers / --modules / --module against the model's config.json, --out writable:
    before any weights or data are read (load_model is never reached)."""
    import emsedit_jax.api as api
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["train", "--model", str(tiny_model_dir), "--dataset", "demo", "--out", str(tmp_path / "run")]
    cases = [(["--layers", "abc"], "--layers abc: expected a layer or a range like 18-23"),
             (["--layers", "2-9"], "--layers: module 'model.layers.4.mlp.up_proj': layer 4 out of range"),
             (["--module", "mlp.nope"], "--module: module 'model.layers.1.mlp.nope': 'mlp.nope' is not a linear"),
             (["--modules", "transformer.h.1.mlp.c_fc"], "--modules: module 'transformer.h.1.mlp.c_fc' is not of"),
             (["--method", "mend", "--key-memory", "1"], "--key-memory applies to the ridge solve")]
    for flags, message in cases:
        with pytest.raises(ConfigError) as e:
            cli.main([*base, *flags])
        assert message in str(e.value)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--out .*file is a file, so run cannot be created"):
        cli.main([*base[:-1], str(blocker / "run")])
    assert not (tmp_path / "run").exists()


def test_output_paths_checked_before_the_model_loads(tiny_editor_dir, tmp_path, monkeypatch):
    """evaluate --out / --plot / --per-request and edit --save: a place where nothing can
    be written (/proc) or a file where a folder is needed stops the run at once."""
    import emsedit_jax.api as api
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    editor = str(tiny_editor_dir)
    for argv, message in [(["evaluate", "--editor", editor, "--out", "/proc/emsedit/results.json"],
                           "--out /proc/emsedit/results.json: cannot write in /proc"),
                          (["evaluate", "--editor", editor, "--plot", str(blocker / "curve.png")],
                           "is a file, so curve.png cannot be created"),
                          (["evaluate", "--editor", editor, "--per-request", str(tmp_path)],
                           "--per-request .*: is a folder, expected a file name"),
                          (["edit", "--editor", editor, "--fact", "w1", "w2", "--save", str(blocker)],
                           "--save .*file: exists and is not a folder")]:
        with pytest.raises(ConfigError, match=message):
            cli.main(argv)
    assert list(tmp_path.iterdir()) == [blocker]


def test_model_from_the_editor(tiny_editor_dir, capsys):
    """generate / edit without --model use the model the editor was trained for."""
    out = cli.main(["generate", "--editor", str(tiny_editor_dir), "--prompt", "w1 w2", "--max-new-tokens", "2"])
    assert len(out["completions"]) == 1
    res = cli.main(["edit", "--editor", str(tiny_editor_dir), "--fact", "w1 w2 w3", "w4", "--max-new-tokens", "2"])
    assert len(res["before"]) == len(res["after"]) == 1


def _run_cli(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMSEDIT_JAX_LAPACK_THREADS": "0"}
    return subprocess.run([sys.executable, "-m", "emsedit_jax.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_user_errors_end_in_one_line_and_status_2(tmp_path):
    """The command line as a user runs it: each mistake fails before any model loads,
    with exit status 2, no traceback, and a last line naming the flag or file."""
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "editor.json").write_text("{not json")
    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "thirty-two"}))
    cases = [
        (["train", "--out", "x"], "the following arguments are required: --dataset"),
        (["evaluate", "--editor", str(garbage)], f"{garbage / 'editor.json'}: not a valid editor record"),
        (["train", "--dataset", "demo", "--model", str(bad_model), "--out", str(tmp_path / "run")],
         "config.json: hidden_size must be a whole number > 0, got 'thirty-two'"),
    ]
    for argv, message in cases:
        out = _run_cli(*argv, cwd=tmp_path)
        assert out.returncode == 2, (argv, out.stderr)
        assert "Traceback" not in out.stderr and message in out.stderr.strip().splitlines()[-1], (argv, out.stderr)
    debug = _run_cli("evaluate", "--editor", str(garbage), "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_console_reports_user_errors_and_keeps_internal_tracebacks(monkeypatch, capsys):
    def fail(exc):
        def main(argv):
            raise exc
        return main
    monkeypatch.setattr(cli, "main", fail(UserError("data.json: record 3: field 'prompt': expected a string")))
    assert cli.console(["train"]) == 2
    assert capsys.readouterr().err == "emsedit-jax: error: data.json: record 3: field 'prompt': expected a string\n"
    monkeypatch.setattr(cli, "main", fail(RuntimeError("internal")))
    with pytest.raises(RuntimeError):
        cli.console(["train"])


def test_trust_region_is_the_methods_default_and_an_evaluation_override():
    """EMSEdit caps each step's update (max_update 0.03; 0.1 with the batch protocol's
    shared hypernetwork or keys at the subject); the baselines and the faithful preset
    do not; `evaluate --max-update` overrides an editor's value, None keeps it."""
    ecfg = EditorConfig(modules=("m",))
    assert ecfg.max_update == 0.03
    assert EditorConfig(modules=("m",), step_specific=False).max_update == 0.1
    assert EditorConfig(modules=("m",), key_positions="subject").max_update == 0.1
    assert EditorConfig(modules=("m",), step_specific=False, max_update=0.03).max_update == 0.03
    assert EditorConfig(modules=("m",), method="malmen").max_update == 0.0
    assert configs(("m",), preset="faithful")[0].max_update == 0.0
    assert EvalConfig().editor_config(ecfg) is ecfg
    assert EvalConfig(max_update=0.0).editor_config(ecfg).max_update == 0.0
    with pytest.raises(ConfigError, match=r"EditorConfig.max_update: expected a finite number >= 0"):
        EditorConfig(modules=("m",), max_update=-1.0)
