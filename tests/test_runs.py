"""Run identity, the training folder's lock and the deterministic-ops switch (no model
needed)."""

from __future__ import annotations

import json
import os

import pytest

from emsedit_jax.runs import (DETERMINISTIC_XLA_FLAGS, RunError, RunLock, claim_run, identity_diff,
                              use_deterministic_ops)


def test_claim_run_names_every_differing_key(tmp_path):
    ident = {"model": {"name": "m", "config_sha256": "a"}, "split": {"split_seed": 0}, "dtype": "float32"}
    claim_run(tmp_path / "run", ident)
    assert claim_run(tmp_path / "run", ident) == ident          # the same run: accepted
    other = {"model": {"name": "m", "config_sha256": "b"}, "split": {"split_seed": 0}, "dtype": "bfloat16",
             "seed": 1}
    with pytest.raises(RunError) as e:
        claim_run(tmp_path / "run", other)
    assert str(e.value) == (f"{tmp_path / 'run'} holds another training run (it differs in dtype, "
                            "model.config_sha256, seed); use another --out folder, or delete this one to start over")
    assert identity_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c"]
    (tmp_path / "run" / "run.json").write_text("{broken")
    with pytest.raises(RunError, match=r"run\.json: unreadable run record"):
        claim_run(tmp_path / "run", ident)


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "some-other-host"}))
    with pytest.raises(RunError) as e:
        RunLock(tmp_path).__enter__()
    assert str(e.value) == (f"{tmp_path} is locked by process 1 on host some-other-host; if no run is writing it, "
                            f"delete {tmp_path / '.lock'}")
    (tmp_path / ".lock").write_text("garbage")                  # unreadable: taken over
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_use_deterministic_ops_adds_flags_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    use_deterministic_ops()
    use_deterministic_ops()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=0", *DETERMINISTIC_XLA_FLAGS]
