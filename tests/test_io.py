"""Checkpoint loading and export: round trips through transformers, sharded files,
bfloat16, hub ids resolved offline from a local cache, and every error path naming the
file and tensor concerned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from emsedit_jax.models import (CheckpointError, ConfigError, ModelConfig, abstract_params, apply_deltas,  # noqa: E402
                                get_kernel, load_model, logits, module_shape, save_hf)
from emsedit_jax.models import safetensors_io  # noqa: E402
from emsedit_jax.models.hf_io import hf_state_dict  # noqa: E402
from emsedit_jax.models.transformer import stack_layers, unstack_layers  # noqa: E402

CFG = dict(vocab_size=67, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
IDS = np.array([[5, 9, 11, 3, 2, 0], [7, 1, 4, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return folder, model


def torch_logits(folder):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK)).logits.numpy()


def test_export_round_trip_with_edit(tiny, tmp_path):
    folder, _ = tiny
    model = load_model(folder, tokenizer=False)
    name = "model.layers.1.mlp.up_proj"
    delta = {name: 0.05 * jax.random.normal(jax.random.key(1), module_shape(model.config, name))}
    edited = apply_deltas(model.config, model.params, delta)
    np.testing.assert_allclose(get_kernel(model.config, edited, name),
                               get_kernel(model.config, model.params, name) + delta[name], rtol=1e-6)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params(model.config, stacked=False))
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), model.params)
    out = save_hf(model, tmp_path / "edited", edited)
    ours = np.asarray(logits(model.config, edited, IDS, MASK))
    real = MASK.astype(bool)
    np.testing.assert_allclose(torch_logits(out)[real], ours[real], atol=1e-5)
    # The edit changed the model, and the original parameters are untouched.
    before = np.asarray(logits(model.config, model.params, IDS, MASK))
    assert np.abs(before - ours)[real].max() > 1e-3
    chex.assert_trees_all_equal(load_model(folder, tokenizer=False).params, model.params)


def test_layer_layouts_agree(tiny, tmp_path):
    """The list layout (load_model's default) and the stacked one hold the same tensors,
    compute the same logits (unrolled layers vs a scan), edit the same kernel, and
    export the same checkpoint."""
    folder, _ = tiny
    listed = load_model(folder, tokenizer=False)
    stacked = load_model(folder, tokenizer=False, stacked=True)
    assert isinstance(listed.params["layers"], tuple) and not isinstance(stacked.params["layers"], tuple)
    chex.assert_trees_all_equal(stack_layers(listed.params), stacked.params)
    chex.assert_trees_all_equal(unstack_layers(stacked.params), listed.params)
    np.testing.assert_allclose(logits(listed.config, listed.params, IDS, MASK),
                               logits(stacked.config, stacked.params, IDS, MASK), atol=1e-6)
    name = "model.layers.1.self_attn.o_proj"
    delta = {name: jnp.full(module_shape(listed.config, name), 0.01)}
    a, b = (apply_deltas(m.config, m.params, delta) for m in (listed, stacked))
    np.testing.assert_array_equal(get_kernel(listed.config, a, name), get_kernel(stacked.config, b, name))
    np.testing.assert_array_equal(get_kernel(listed.config, a, "model.layers.0.self_attn.o_proj"),
                                  get_kernel(listed.config, listed.params, "model.layers.0.self_attn.o_proj"))
    sa, sb = hf_state_dict(listed.config, a), hf_state_dict(stacked.config, b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


def test_sharded_and_bfloat16(tiny, tmp_path):
    folder, _ = tiny
    model = load_model(folder, tokenizer=False)
    out = save_hf(model, tmp_path / "sharded", max_shard_bytes=4000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = load_model(out, tokenizer=False)
    chex.assert_trees_all_equal(again.params, model.params)
    np.testing.assert_allclose(torch_logits(out)[MASK > 0], torch_logits(folder)[MASK > 0], atol=1e-6)

    bf = save_hf(model, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    table = safetensors_io.tensor_table(bf / "model.safetensors")
    assert {v.dtype for v in table.values()} == {"BF16"}
    low = load_model(bf, dtype=jnp.bfloat16, tokenizer=False)
    assert {a.dtype for a in jax.tree.leaves(low.params)} == {jnp.dtype(jnp.bfloat16)}
    a = np.asarray(logits(low.config, low.params, IDS, MASK))[MASK > 0]
    b = np.asarray(logits(model.config, model.params, IDS, MASK))[MASK > 0]
    assert np.abs(a - b).max() < 0.05 and np.abs(a - b).max() > 0


def test_hub_id_resolved_from_local_cache(tiny, tmp_path, monkeypatch):
    folder, _ = tiny
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = load_model("someorg/tiny-llama", tokenizer=False)
    assert model.config.num_layers == 2
    with pytest.raises(CheckpointError, match="someorg/absent"):
        load_model("someorg/absent", tokenizer=False)


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_error_missing_files(tiny, tmp_path):
    dst = _copy(tiny[0], tmp_path)
    (dst / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_model(dst, tokenizer=False)
    dst2 = _copy(tiny[0], tmp_path / "b")
    (dst2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(dst2, tokenizer=False)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "does-not-exist", tokenizer=False)


def test_error_unsupported_architecture_and_fields(tiny, tmp_path):
    dst = _copy(tiny[0], tmp_path)
    _edit_config(dst, model_type="bert")
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'bert' is not supported"):
        load_model(dst, tokenizer=False)
    _edit_config(dst, model_type="llama", hidden_act="swish_custom")
    with pytest.raises(ConfigError, match="activation 'swish_custom'"):
        load_model(dst, tokenizer=False)
    _edit_config(dst, hidden_act="silu", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        load_model(dst, tokenizer=False)
    _edit_config(dst, rope_parameters={"rope_type": "default", "rope_theta": 1e4}, some_new_knob=3)
    with pytest.raises(ConfigError, match="some_new_knob"):
        load_model(dst, tokenizer=False)
    with pytest.warns(UserWarning, match="some_new_knob"):
        load_model(dst, tokenizer=False, strict=False)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_hf(dict(CFG, model_type="qwen2", use_sliding_window=True))


def test_error_shape_mismatch_and_missing_tensor(tiny, tmp_path):
    dst = _copy(tiny[0], tmp_path)
    _edit_config(dst, intermediate_size=25)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        load_model(dst, tokenizer=False)
    dst2 = _copy(tiny[0], tmp_path / "b")
    _edit_config(dst2, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.2\..*' is missing"):
        load_model(dst2, tokenizer=False)


def test_error_corrupt_tensors(tiny, tmp_path):
    dst = _copy(tiny[0], tmp_path)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file: .*not fully covered"):
        load_model(dst, tokenizer=False)
    f.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(dst, tokenizer=False)
    model = load_model(tiny[0], tokenizer=False)
    state = {k: np.array(v) for k, v in
             hf_state_dict(model.config, model.params).items()}
    state["model.layers.1.self_attn.k_proj.weight"][0, 0] = np.nan
    safetensors_io.write(f, state)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' contains NaN"):
        load_model(dst, tokenizer=False)
    state["model.layers.1.self_attn.k_proj.weight"][0, 0] = 0.0
    state["model.layers.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    safetensors_io.write(f, state)
    with pytest.raises(CheckpointError, match="mlp.extra.weight"):
        load_model(dst, tokenizer=False)


def test_safetensors_round_trip_through_the_library(tmp_path):
    """float32, bfloat16 and int32 written by the package's writer come back bit for bit
    through the library's own reader and through `safetensors_io.read`, whole or sliced;
    errors name the file and the tensor."""
    from safetensors.numpy import load_file
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((5, 7)).astype(np.float32),
               "b": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16), "c": np.arange(6, dtype=np.int32)}
    f = tmp_path / "x.safetensors"
    safetensors_io.write(f, tensors)
    assert f.stat().st_mode & 0o777 == 0o644 and not list(tmp_path.glob(".*tmp"))
    assert safetensors_io.tensor_table(f) == {"a": ((5, 7), "F32"), "b": ((3, 4), "BF16"), "c": ((6,), "I32")}
    for back in (load_file(str(f)), {k: safetensors_io.read(f, k) for k in tensors}):
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype
            np.testing.assert_array_equal(back[k].view(np.uint8), v.view(np.uint8))
    np.testing.assert_array_equal(safetensors_io.read(f, "a", (slice(1, 3), slice(2, None))), tensors["a"][1:3, 2:])
    part = safetensors_io.read(f, "b", (slice(None), slice(1, 3)))
    assert part.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(part.view(np.uint16), tensors["b"][:, 1:3].view(np.uint16))
    with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor 'zz'"):
        safetensors_io.read(f, "zz")
    with pytest.raises(CheckpointError, match=r"y\.safetensors: cannot write"):
        safetensors_io.write(tmp_path / "y.safetensors", {"o": np.array([object()])})
    assert not (tmp_path / "y.safetensors").exists()


@pytest.fixture(scope="module")
def shard_load(tiny_model_dir, tmp_path_factory):
    from conftest import run_on_host_devices
    work = tmp_path_factory.mktemp("shard_load")
    run_on_host_devices(Path(__file__).with_name("load_check.py"), tiny_model_dir, work, work / "out.json")
    return json.loads((work / "out.json").read_text())


@pytest.mark.parametrize("run", ["list 1x4", "list 2x2", "stacked 1x4", "stacked 2x2"])
def test_load_into_shards(shard_load, run):
    """A bfloat16 checkpoint in several files with an index, loaded onto 4 host devices
    (tests/load_check.py): every shard holds exactly its slice of the unsharded load,
    kernels (stored transposed) included; split tensors are read slice by slice."""
    assert shard_load["has_index"] and shard_load["n_files"] > 2
    r = shard_load["runs"][run]
    assert r["mismatches"] == []
    model_axis = int(run[-1])
    # embedding + per layer q/k/v/o/gate/up/down: 1 + 7 * 4 split arrays in the list
    # layout, 1 + 7 stacked arrays in the stacked one.
    assert r["n_split"] == (29 if run.startswith("list") else 8)
    assert r["largest_read_of_split"] == 1 / model_axis
    assert r["n_tensors_read_in_slices"] == 29
    # Each device holds its slices and the replicated norm scales: far below the model.
    assert len(r["device_bytes"]) == 4 and max(r["device_bytes"]) < r["total_bytes"] / model_axis * 1.1


def test_load_model_onto_a_mesh(shard_load):
    assert shard_load["load_model_mesh_equal"]
