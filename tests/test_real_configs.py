"""The config.json files of the models the method is meant for, as they are on the Hub
(tests/hub_configs/<org>--<name>.json), load unchanged and build abstract models whose
tensors have exactly the names and shapes of transformers' models built from the same
files; a bare hub id resolves through a local Hugging Face cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emsedit_jax.models import CheckpointError, ConfigError, ModelConfig, abstract_params, logits
from emsedit_jax.models.hf_io import hf_shapes, read_config, resolve

HUB = Path(__file__).with_name("hub_configs")
# Hub id -> (family, parameter count with tied embeddings counted once).
REAL = {
    "EleutherAI/gpt-j-6b": ("gptj", 6_050_882_784),
    "gpt2-xl": ("gpt2", 1_557_611_200),
    "meta-llama/Meta-Llama-3-8B": ("llama", 8_030_261_248),
    "mistralai/Mistral-7B-v0.1": ("llama", 7_241_732_096),
    "Qwen/Qwen2.5-7B-Instruct": ("llama", 7_615_616_512),
}
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def hub_config(hub_id: str) -> dict:
    return json.loads((HUB / f"{hub_id.replace('/', '--')}.json").read_text())


@pytest.mark.parametrize("hub_id", REAL)
def test_real_config_builds_abstract_model(hub_id):
    cfg = ModelConfig.from_hf(hub_config(hub_id), source=hub_id)
    family, n_params = REAL[hub_id]
    assert cfg.family == family
    params = abstract_params(cfg, jnp.bfloat16)      # shapes only, nothing allocated
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) == n_params
    assert sum(int(np.prod(s)) for s in hf_shapes(cfg).values()) == n_params
    out = jax.eval_shape(lambda p, i, m: logits(cfg, p, i, m), params,
                         jax.ShapeDtypeStruct((2, 8), jnp.int32), jax.ShapeDtypeStruct((2, 8), jnp.int32))
    assert out.shape == (2, 8, cfg.vocab_size)


@pytest.mark.parametrize("hub_id", REAL)
def test_real_config_tensors_match_transformers(hub_id):
    """Every tensor name and shape equals that of transformers' model built from the same
    config.json (on torch's meta device: no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    raw = hub_config(hub_id)
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw))
    cfg = ModelConfig.from_hf(raw)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith(_BUFFERS)}
    if cfg.tie_word_embeddings:
        want.pop("lm_head.weight")
    assert hf_shapes(cfg) == want


def test_fields_that_change_the_model_are_refused_by_name():
    gptj = hub_config("EleutherAI/gpt-j-6b")
    for field, value, message in [("rotary", False, "rotary=false"),
                                  ("scale_attn_weights", False, "scale_attn_weights=false"),
                                  ("tie_word_embeddings", True, "tied GPT-J heads"),
                                  ("parallel_residual_mode", 2, r"\['parallel_residual_mode'\]")]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf({**gptj, field: value}, source="gpt-j/config.json")
    with pytest.raises(ConfigError, match=r"config\.json: unrecognised config field\(s\) \['new_knob'\].*delete them"):
        ModelConfig.from_hf({**hub_config("gpt2-xl"), "new_knob": 1})
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf({**hub_config("gpt2-xl"), "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_hf({**hub_config("Qwen/Qwen2.5-7B-Instruct"), "use_sliding_window": True})


def fake_hub_cache(root: Path, hub_id: str, files: dict[str, str]) -> Path:
    """The folder layout huggingface_hub keeps under HF_HUB_CACHE: a snapshot per commit
    and refs/main naming it."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("0123456789abcdef" * 3)[:40]
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snap.name)
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache under tmp_path."""
    import huggingface_hub.constants as c
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return root


def test_bare_hub_id_resolves_from_the_local_cache(hf_cache, tmp_path, monkeypatch):
    snap = fake_hub_cache(hf_cache, "gpt2-xl", {"config.json": json.dumps(hub_config("gpt2-xl"))})
    monkeypatch.chdir(tmp_path)          # no folder named gpt2-xl here
    folder = resolve("gpt2-xl")
    assert folder == snap
    cfg, raw = read_config(folder)
    assert (cfg.num_layers, cfg.hidden_size, raw["output_past"]) == (48, 1600, True)
    with pytest.raises(CheckpointError, match="gpt2-absent: no such checkpoint folder"):
        resolve("gpt2-absent")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve("not a/hub/id")
    # A local folder of that name wins over the cache.
    shutil.copytree(snap, tmp_path / "gpt2-xl")
    assert resolve("gpt2-xl") == Path("gpt2-xl")
