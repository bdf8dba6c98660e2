"""`emsedit-jax plan`: the memory of the jitted edit and training steps compiled for
abstract inputs (config.json alone, nothing allocated) equals that of the same steps
compiled for the real model's arrays on the same 2x2 mesh of host devices
(tests/plan_check.py, in a subprocess); the command re-starts itself on simulated
devices when the mesh needs more than JAX has, and says whether a device fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_on_host_devices

from emsedit_jax.cli import main
from emsedit_jax.errors import UserError
from emsedit_jax.plan import DEVICE_MEMORY, USABLE, packed_rows

FIELDS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")


@pytest.fixture(scope="module")
def check(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "out.json"
    run_on_host_devices(Path(__file__).with_name("plan_check.py"), tiny_model_dir, out)
    return json.loads(out.read_text())


@pytest.mark.parametrize("step", ["edit", "train"])
def test_plan_matches_the_real_run(check, step):
    planned = next(s for s in check["plan"]["steps"] if s["step"] == step)
    real = check["real"][step]
    assert real["finite"]
    assert {f: planned[f] for f in FIELDS} == {f: real[f] for f in FIELDS}
    assert planned["argument_bytes"] > 0 and planned["temp_bytes"] > 0 and planned["flops_per_edit"] > 0
    assert check["plan"]["mesh"] == [2, 2] and check["plan"]["rows"] % 2 == 0
    if step == "train":         # the hypernetworks and their optimiser state are donated
        assert planned["alias_bytes"] > 0


def test_packed_rows():
    """The plan packs like a run: rows x (length + answer slots) least, rows padded to
    the data axis."""
    assert packed_rows(10, 24, 4, 512, 1) == (1, 240, 40)       # one row holds all ten
    assert packed_rows(100, 24, 4, 512, 1) == (5, 480, 80)      # 20 a row: 5 x 480 tokens, not 5 x 512
    assert packed_rows(100, 24, 4, 512, 4) == (8, 480, 80)      # rows padded to the data axis


def test_cli_plan_from_config_alone(tiny_model_dir, tmp_path, capsys):
    """A folder holding only config.json; --mesh 1,2 needs two devices, so the command
    re-starts itself with two simulated CPU devices."""
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    out = main(["plan", "--model", str(folder), "--mesh", "1,2", "--steps", "edit", "--rank", "8", "--n-edits", "4",
                "--modules", "model.layers.3.mlp.up_proj", "--device", "v5e", "--json", str(tmp_path / "p.json")])
    text = capsys.readouterr().out
    assert "mesh 1x2 (2 cpu device(s))" in text and "| edit |" in text and "v5e (16 GiB" in text and "fits" in text
    assert out == json.loads((tmp_path / "p.json").read_text())
    assert out["fits"] is True and [s["step"] for s in out["steps"]] == ["edit"]
    assert out["steps"][0]["argument_bytes"] < USABLE * DEVICE_MEMORY["v5e"]
    for bad in (["--mesh", "2"], ["--steps", "edit,eval"]):
        with pytest.raises(UserError, match=bad[0]):
            main(["plan", "--model", str(folder), *bad])
