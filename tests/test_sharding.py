"""Sharding over a device mesh. The jitted edit and meta-training steps give the
single-device numbers when the same functions get their inputs placed on meshes of 4
host devices (FSDP 4x1, 2x2, 1x4 and tensor-parallel 1x4), compile once per mesh, and
the LLM parameters, deltas, hypernetworks and batch rows are really split
(tests/sharding_check.py, run in a subprocess because the host device count is fixed
when JAX starts). Also: the rule table, the --mesh / --sharding options and their
errors, and that the CLI hands --mesh, --remat and --capture-chunk to train() and
run_protocol()."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_on_host_devices, synthetic_requests
from jax.sharding import PartitionSpec as P

from emsedit_jax import sharding
from emsedit_jax.models import ModelConfig, tensor_specs
from emsedit_jax.partition import FSDP, RULES, TENSOR, spec_for
from emsedit_jax.sharding import parse_mesh

TOL = 1e-4    # float32: the sharded steps sum in a different order
MESHES = ["4x1 fsdp", "2x2 fsdp", "1x4 fsdp", "1x4 tp"]


@pytest.fixture(scope="module")
def check(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "out.json"
    run_on_host_devices(Path(__file__).with_name("sharding_check.py"), tiny_model_dir, out)
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", MESHES)
def test_same_jitted_steps_on_a_mesh_match_one_device(check, mesh):
    r = check["meshes"][mesh]
    for step in ("train_err", "edit_err"):
        for what, err in r[step].items():
            assert err < TOL, f"mesh {mesh}: {step[:-4]} step differs from one device in {what}: {err:.2e}"
    # The same two jitted functions: one more compilation each for the mesh (two batches
    # of a stream, outputs fed back as they come), one each for the single device.
    assert r["compilations"] == [1, 1], r["compilations"]
    assert check["single_device_compilations"] == [1, 1]


def test_parameters_deltas_and_rows_are_split(check):
    assert check["rows_per_view"] == 3          # padded to 4 rows on row axes of size 4
    # The model is in the list layout: one (d_in, d_out) kernel per layer.
    full = {"up_proj_kernel": [[32, 64]], "down_proj_kernel": [[64, 32]], "embedding": [[152, 32]],
            "norm": [[32]], "q_proj_kernel": [[32, 32]], "o_proj_kernel": [[32, 32]], "up_proj_delta": [[32, 64]],
            "down_proj_delta": [[64, 32]], "hypernet_A": [[96, 16]]}
    meshes = check["meshes"]
    # data axis only: parameters replicated, one padded row per device.
    assert meshes["4x1 fsdp"]["shards"] == {**full, "batch_rows": [[1, 16]]}
    # FSDP over 4: every matrix split along the hidden size (32 -> 8), norm scales
    # replicated, deltas split like their kernels, rows split over the fsdp axis too.
    # The editor's hypernetwork is split along its (d_in + d_out) axis.
    assert meshes["1x4 fsdp"]["shards"] == {
        **full, "up_proj_kernel": [[8, 64]], "down_proj_kernel": [[64, 8]], "embedding": [[152, 8]],
        "q_proj_kernel": [[8, 32]], "o_proj_kernel": [[32, 8]], "up_proj_delta": [[8, 64]],
        "down_proj_delta": [[64, 8]], "hypernet_A": [[24, 16]], "batch_rows": [[1, 16]]}
    assert meshes["1x4 fsdp"]["kernel_spec"] == str(P(FSDP))
    assert meshes["1x4 fsdp"]["n_kernel_shards"] == 4
    # Tensor parallel over 4: up / q split on their outputs, down / o on their inputs, the
    # embedding on the vocabulary; rows are not split over the tensor axis.
    assert meshes["1x4 tp"]["shards"] == {
        **full, "up_proj_kernel": [[32, 16]], "down_proj_kernel": [[16, 32]], "embedding": [[38, 32]],
        "q_proj_kernel": [[32, 8]], "o_proj_kernel": [[8, 32]], "up_proj_delta": [[32, 16]],
        "down_proj_delta": [[16, 32]], "hypernet_A": [[24, 16]], "batch_rows": [[3, 16]]}
    assert meshes["1x4 tp"]["kernel_spec"] == str(P(None, TENSOR))
    # 2 x 2: half of everything on each fsdp device, rows over all 4.
    assert meshes["2x2 fsdp"]["shards"] == {
        **full, "up_proj_kernel": [[16, 64]], "down_proj_kernel": [[64, 16]], "embedding": [[152, 16]],
        "q_proj_kernel": [[16, 32]], "o_proj_kernel": [[32, 16]], "up_proj_delta": [[16, 64]],
        "down_proj_delta": [[64, 16]], "hypernet_A": [[48, 16]], "batch_rows": [[1, 16]]}
    # The steps' new deltas come back split like their kernels (the constraint inside).
    assert meshes["1x4 tp"]["delta_specs"] == sorted([str(P(TENSOR)), str(P(None, TENSOR))])


def test_rule_table():
    fsdp, tp = {"data": 1, FSDP: 4, TENSOR: 1}, {"data": 1, FSDP: 1, TENSOR: 4}
    assert spec_for("mlp_in", (576, 1536), fsdp) == P(FSDP)                    # hidden size
    assert spec_for("mlp_in", (576, 1536), tp) == P(None, TENSOR)              # column parallel
    assert spec_for("mlp_out", (30, 1536, 576), tp, skip=1) == P(None, TENSOR)  # row parallel; layer axis whole
    assert spec_for("mlp_in", (30, 575, 1536), fsdp, skip=1) == P(None, None, FSDP)  # 575 indivisible: next dim
    assert spec_for("mlp_in", (1536,), tp) == P(TENSOR)                        # a bias follows its outputs
    assert spec_for("mlp_out", (576,), tp) == P()
    assert spec_for("norm", (30, 576), fsdp, skip=1) == P()                    # norm scales replicated
    assert spec_for("mlp_in", (8, 8), fsdp) == P()                             # too small
    assert spec_for("embedding", (49152, 576), {TENSOR: 8}) == P(TENSOR)       # vocabulary parallel
    assert spec_for("attn_q", (576, 576), {"data": 4}) == P()                  # data axis only
    assert spec_for("lm_head", (576, 49152), {FSDP: 2, TENSOR: 4}) == P(FSDP, TENSOR)   # both at once
    with pytest.raises(ValueError, match="unknown tensor role 'mlp'"):
        spec_for("mlp", (4, 4), fsdp)
    # Every tensor of every family has a role in the table.
    for hf in ({"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 2, "tie_word_embeddings": False},
               {"model_type": "gpt2", "vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2},
               {"model_type": "gptj", "vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "rotary_dim": 4}):
        roles = {s.role for s in tensor_specs(ModelConfig.from_hf(hf)).values()}
        assert roles <= set(RULES), roles - set(RULES)
        assert {"embedding", "mlp_in", "mlp_out", "attn_o", "norm"} <= roles


def test_mesh_option_and_errors():
    assert parse_mesh("1,4") == (1, 4) and parse_mesh("2x2") == (2, 2)
    for bad in ("4", "a,b", "0,2", "1,2,3"):
        with pytest.raises(ValueError, match="DATA,MODEL"):
            parse_mesh(bad)
    mesh = sharding.make_mesh(1, 1)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 2 devices.*xla_force_host_platform_device_count"):
        sharding.make_mesh(1, 2, strategy="tp")
    with pytest.raises(ValueError, match="--sharding takes fsdp or tp"):
        sharding.mesh_from_spec("1,1", "ddp")
    assert sharding.mesh_from_spec(None) is None
    assert sharding.maybe_initialize_distributed(False) is False


def test_padding_to_the_data_axis():
    """Batches (and stacked batches like RLEdit's buffer: rows on axis 1) get empty rows
    up to a multiple of the row axes (data x fsdp); other leaves are left alone."""
    import types

    from emsedit_jax.editor.capture import IGNORE, Batch
    fake_mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 3})
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

    import emsedit_jax.api  # noqa: F401  (imported first: it binds train() by name, which is patched below)
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
    assert dict(seen["train"]["mesh"].shape) == {"data": 1, "fsdp": 1, "tensor": 1} and seen["train"]["remat"] is True

    model = load_model(tiny_model_dir, tokenizer=False)
    ecfg = EditorConfig(key_memory=0.0, modules=("model.layers.3.mlp.up_proj",), rank=4, n_blocks=1)
    save_editor(tmp_path / "editor", ecfg, init_editor(ecfg, model.config, jax.random.key(0)), {})
    out = main(["evaluate", *common, "--editor", str(tmp_path / "editor"), "--n-edits", "4", "--num-seq", "2",
                "--mesh", "1x1", "--sharding", "tp", "--capture-chunk", "2"])
    kw = seen["evaluate"]
    assert dict(kw["mesh"].shape) == {"data": 1, "fsdp": 1, "tensor": 1} and kw["remat"] is False
    assert kw["capture_chunk"] == 2
    assert out["config"]["scale"]["mesh"] == "1x1" and out["config"]["scale"]["sharding"] == "tp"
    assert out["config"]["evaluate"]["capture_chunk"] == 2
    main(["train", *common, "--out", str(tmp_path / "run2")])
    assert seen["train"]["mesh"] is None and seen["train"]["remat"] is False
    with pytest.raises(ValueError, match="needs 4 devices"):
        main(["train", *common, "--out", str(tmp_path / "run3"), "--mesh", "2,2"])
