"""Sharding over a device mesh. The sharded edit and meta-training steps match the
single-device ones on meshes (4,1), (2,2) and (1,4) of 4 host devices, and the LLM
parameters, deltas, hypernetworks and batch rows are really split (tests/sharding_check.py,
run in a subprocess because the host device count is fixed when JAX starts). Also: the
partition rule, the --mesh option and its errors, and that the CLI hands --mesh, --remat
and --capture-chunk to train() and run_protocol()."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_on_host_devices, synthetic_requests
from jax.sharding import PartitionSpec as P

from emsedit_jax import sharding
from emsedit_jax.models.transformer import unstack_layers
from emsedit_jax.sharding import MODEL, fsdp_spec, parse_mesh

TOL = 1e-4    # float32: the sharded steps sum in a different order


@pytest.fixture(scope="module")
def check(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "out.json"
    run_on_host_devices(Path(__file__).with_name("sharding_check.py"), tiny_model_dir, out)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["4x1", "2x2", "1x4"])
def test_sharded_steps_match_single_device(check, mesh):
    r = check["meshes"][mesh]
    for step in ("train_err", "edit_err"):
        for what, err in r[step].items():
            assert err < TOL, f"mesh {mesh}: sharded {step[:-4]} step differs from one device in {what}: {err:.2e}"
    # Two batches of the stream, each step compiled once.
    assert r["compilations"] == [1, 1], r["compilations"]


def test_parameters_deltas_and_rows_are_split(check):
    assert check["rows_per_view"] == 3          # padded to 4 rows on the data axes of size 4 and 2
    # The model is in the list layout: one (d_in, d_out) kernel per layer.
    full = {"up_proj_kernel": [[32, 64]], "down_proj_kernel": [[64, 32]], "embedding": [[152, 32]],
            "norm": [[32]], "up_proj_delta": [[32, 64]], "down_proj_delta": [[64, 32]],
            "hypernet_A": [[96, 16]]}
    # data axis only: parameters replicated, one padded row per device.
    assert check["meshes"]["4x1"]["shards"] == {**full, "batch_rows": [[1, 16]]}
    # model axis of 4: every large tensor split 4 ways on its largest dimension; norm
    # scales replicated; deltas split like their kernels.
    assert check["meshes"]["1x4"]["shards"] == {
        **full, "up_proj_kernel": [[32, 16]], "down_proj_kernel": [[16, 32]], "embedding": [[38, 32]],
        "up_proj_delta": [[32, 16]], "down_proj_delta": [[16, 32]], "batch_rows": [[3, 16]]}
    assert check["meshes"]["1x4"]["kernel_spec"] == str(P(None, MODEL))
    assert check["meshes"]["1x4"]["n_kernel_shards"] == 4
    # 2 x 2 with the editor sharded too: the hypernetwork's (d_in + d_out) axis is split.
    assert check["meshes"]["2x2"]["shards"] == {
        **full, "up_proj_kernel": [[32, 32]], "down_proj_kernel": [[32, 32]], "embedding": [[76, 32]],
        "up_proj_delta": [[32, 32]], "down_proj_delta": [[32, 32]], "hypernet_A": [[48, 16]],
        "batch_rows": [[2, 16]]}


def test_parameter_specs_in_both_layer_layouts():
    """The stacked layout never splits its leading layer axis; the list layout's
    per-layer kernels are split on their largest divisible dimension the same way."""
    w = np.zeros((3, 64, 128), np.float32)
    stacked = {"layers": {"mlp": {"kernel": w}, "norm": np.zeros((3, 64), np.float32)}, "e": np.zeros((256, 64))}
    specs = sharding.param_specs(stacked, 4, min_size=16)
    assert specs["layers"]["mlp"]["kernel"] == P(None, None, MODEL)
    assert specs["layers"]["norm"] == P(None, None) and specs["e"] == P(MODEL, None)
    listed = unstack_layers(stacked)
    specs = sharding.param_specs(listed, 4, min_size=16)
    assert all(s["mlp"]["kernel"] == P(None, MODEL) and s["norm"] == P(None) for s in specs["layers"])
    assert specs["e"] == P(MODEL, None)


def test_partition_rule():
    assert fsdp_spec((30, 576, 1536), 4, skip=1) == P(None, None, MODEL)      # largest divisible dim
    assert fsdp_spec((30, 1536, 576), 4, skip=1) == P(None, MODEL, None)
    assert fsdp_spec((30, 1536, 576), 7, skip=1) == P(None, None, None)       # nothing divisible
    assert fsdp_spec((30, 1535, 576), 4, skip=1) == P(None, None, MODEL)      # the next largest then
    assert fsdp_spec((64, 576), 4, skip=1) == P(None, None)                   # a stacked norm scale
    assert fsdp_spec((8, 8), 4) == P(None, None)                              # too small
    assert fsdp_spec((49152, 576), 1) == P(None, None)                        # model axis of size 1
    assert fsdp_spec((49152, 576), 8) == P(MODEL, None)                       # vocabulary axis


def test_mesh_option_and_errors():
    assert parse_mesh("1,4") == (1, 4) and parse_mesh("2x2") == (2, 2)
    for bad in ("4", "a,b", "0,2", "1,2,3"):
        with pytest.raises(ValueError, match="DATA,MODEL"):
            parse_mesh(bad)
    mesh = sharding.make_mesh(1, 1)
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="needs 2 devices.*xla_force_host_platform_device_count"):
        sharding.make_mesh(2, 1)
    assert sharding.mesh_from_spec(None) is None
    assert sharding.maybe_initialize_distributed(False) is False
    # Placement pads a batch to the data axis and leaves placed arrays as they are.
    params = {"layers": {"w": np.ones((2, 64, 128), np.float32)}, "e": np.ones((10, 4), np.float32)}
    placed = sharding.place_params(params, mesh)
    assert sharding.place(placed, sharding.param_shardings(placed, mesh))["layers"]["w"] is placed["layers"]["w"]
    assert isinstance(placed["e"], jax.Array)


def test_padding_to_the_data_axis():
    """Batches (and stacked batches like RLEdit's buffer: rows on axis 1) get empty rows
    up to a multiple of the data axis; other leaves are left alone."""
    import types

    from emsedit_jax.editor.capture import IGNORE, Batch
    fake_mesh = types.SimpleNamespace(shape={"data": 4, "model": 1})
    b = Batch(np.ones((3, 5), np.int32), np.ones((3, 5), np.int32), np.ones((3, 5), np.int32))
    stacked = jax.tree.map(lambda x: np.stack([x, x]), b)
    out_b, (out_s, weights) = sharding.pad_for_mesh((b, (stacked, np.ones(2))), fake_mesh)
    assert out_b.input_ids.shape == (4, 5) and out_s.input_ids.shape == (2, 4, 5) and weights.shape == (2,)
    for x in (out_b, jax.tree.map(lambda a: a[1], out_s)):
        assert int(x.attention_mask[3].sum()) == 0 and bool((x.labels[3] == IGNORE).all())
        np.testing.assert_array_equal(x.input_ids[:3], b.input_ids)
    assert sharding.pad_for_mesh(out_b, fake_mesh) is out_b


def test_cli_passes_mesh_remat_and_chunk(tiny_model_dir, tmp_path, monkeypatch):
    """train and evaluate build the --mesh mesh and hand it, --remat and --capture-chunk to
    train() / run_protocol() (their sharded steps are checked above)."""
    from test_cli import write_user_file

    import emsedit_jax.evaluate as evaluate_mod
    import emsedit_jax.train as train_mod
    from emsedit_jax.checkpoint import save_editor
    from emsedit_jax.cli import main
    from emsedit_jax.editor.config import EditorConfig
    from emsedit_jax.editor.steps import init_editor
    from emsedit_jax.models import load_model
    seen = {}

    def fake_train(model, ecfg, tcfg, split, out, **kw):
        seen["train"] = kw
        return train_mod.TrainResult(None, [], 0.1, 1.0, 0)

    def fake_run_protocol(model, ecfg, state, split, **kw):
        seen["evaluate"] = kw
        metrics = {"ES": 1.0, "GS": 1.0, "LS": 1.0}
        return evaluate_mod.EvalResult(metrics, metrics, 8, 0.1, 1.0, [], {}, state)

    monkeypatch.setattr(train_mod, "train", fake_train)
    monkeypatch.setattr(evaluate_mod, "run_protocol", fake_run_protocol)
    data = write_user_file(tmp_path / "edits.jsonl", synthetic_requests(16, seed=7))
    common = ["--model", str(tiny_model_dir), "--dataset", "user", "--data", str(data), "--n-train", "8",
              "--n-test", "8", "--quiet"]
    main(["train", *common, "--out", str(tmp_path / "run"), "--mesh", "1,1", "--remat"])
    assert dict(seen["train"]["mesh"].shape) == {"data": 1, "model": 1} and seen["train"]["remat"] is True

    model = load_model(tiny_model_dir, tokenizer=False)
    ecfg = EditorConfig(modules=("model.layers.3.mlp.up_proj",), rank=4, n_blocks=1)
    save_editor(tmp_path / "editor", ecfg, init_editor(ecfg, model.config, jax.random.key(0)), {})
    out = main(["evaluate", *common, "--editor", str(tmp_path / "editor"), "--n-edits", "4", "--num-seq", "2",
                "--mesh", "1x1", "--capture-chunk", "2"])
    kw = seen["evaluate"]
    assert dict(kw["mesh"].shape) == {"data": 1, "model": 1} and kw["remat"] is False and kw["capture_chunk"] == 2
    assert out["config"]["scale"]["mesh"] == "1x1" and out["config"]["evaluate"]["capture_chunk"] == 2
    main(["train", *common, "--out", str(tmp_path / "run2")])
    assert seen["train"]["mesh"] is None and seen["train"]["remat"] is False
    with pytest.raises(ValueError, match="needs 4 devices"):
        main(["train", *common, "--out", str(tmp_path / "run3"), "--mesh", "2,2"])
