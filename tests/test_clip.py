"""Parity of mlx_sd.clip with transformers' CLIPTextModel / CLIPTextModelWithProjection on random weights."""

import gc
import time

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from helpers import SD15, SD21, SDXL, real_config, to_mx, to_np
from mlx_sd.clip import CLIPTextConfig, CLIPTextModel, sanitize
from mlx_sd.weights import ModelLoadError, load_strict, read_json, read_safetensors

BOS, EOS = 49406, 49407

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=77,
    vocab_size=49408,
    layer_norm_eps=1e-5,
    projection_dim=24,
    bos_token_id=0,
    eos_token_id=2,  # the legacy value of the real SD configs: pooled at argmax(input_ids)
    pad_token_id=1,
)
# (name, config overrides, with projection, padding id): SD 1.x pads with EOS, OpenCLIP (SD 2.x, SDXL) with 0.
TINY_CASES = [
    ("quick_gelu", dict(hidden_act="quick_gelu"), False, EOS),
    ("gelu", dict(hidden_act="gelu", num_hidden_layers=4), False, 0),
    ("gelu_projection", dict(hidden_act="gelu"), True, 0),
]

# Tiny models are float32 end to end; observed differences are ~1e-6, so 1e-5 still catches any wrong op.
TINY_ATOL = TINY_RTOL = 1e-5


def prompt_ids(lengths, total, pad):
    """A batch of BOS, random ids, EOS, then padding; one row per length (token count without BOS/EOS)."""
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        row = [BOS, *rng.integers(300, 40000, size=n).tolist(), EOS]
        rows.append(row + [pad] * (total - len(row)))
    return np.array(rows, dtype=np.int64)


def build_reference(config_dict, with_projection):
    """A random transformers model with non-trivial LayerNorms and biases (transformers zeros them)."""
    config = transformers.CLIPTextConfig(**config_dict)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = cls(config).to(torch.float32).eval()  # SDXL's configs say float16; the tests run in float32
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.add_(0.02 * torch.randn_like(module.bias))
    return model


def reference_outputs(model, ids):
    projected = isinstance(model, transformers.CLIPTextModelWithProjection)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
        pooled = model.text_model(torch.from_numpy(ids)).pooler_output if projected else out.pooler_output
    return {
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": pooled.numpy(),
        "hidden_states[-2]": out.hidden_states[-2].numpy(),
        "hidden_states (all)": np.stack([h.numpy() for h in out.hidden_states]),
        "text_embeds": out.text_embeds.numpy() if projected else None,
    }


def our_outputs(model, ids):
    out = model(mx.array(ids))
    mx.eval(out.last_hidden_state, out.pooler_output, out.hidden_states)
    return {
        "last_hidden_state": to_np(out.last_hidden_state),
        "pooler_output": to_np(out.pooler_output),
        "hidden_states[-2]": to_np(out.hidden_states[-2]),
        "hidden_states (all)": np.stack([to_np(h) for h in out.hidden_states]),
        "text_embeds": None if out.text_embeds is None else to_np(out.text_embeds),
    }


def assert_outputs_close(ours, ref, atol, rtol, label):
    """Compares every output and prints the max abs difference of each (pytest -s shows them)."""
    assert (ours["text_embeds"] is None) == (ref["text_embeds"] is None)
    diffs = {}
    for name, expected in ref.items():
        if expected is None:
            continue
        assert ours[name].shape == expected.shape, name
        np.testing.assert_allclose(ours[name], expected, atol=atol, rtol=rtol, err_msg=name)
        diffs[name] = f"{np.abs(ours[name] - expected).max():.1e} (max |ref| {np.abs(expected).max():.1e})"
    print(f"\n{label}: " + ", ".join(f"{k} {v}" for k, v in diffs.items()))


def load_ours(folder):
    config = CLIPTextConfig.from_dict(read_json(folder / "config.json"))
    return load_strict(CLIPTextModel(config), sanitize(read_safetensors(folder)), "text_encoder")


def other_key_form(weights):
    """The key form transformers 5 did not write: strip `text_model.` where present, add it (plus the
    `position_ids` buffer that old Hub checkpoints carry) where absent; `text_projection` stays top-level."""
    if any(k.startswith("text_model.") for k in weights):
        return {k.removeprefix("text_model."): v for k, v in weights.items()}
    out = {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in weights.items()}
    n = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out["text_model.embeddings.position_ids"] = mx.arange(n)[None]  # (1, max_position_embeddings)
    return out


@pytest.mark.parametrize("name, overrides, with_projection, pad", TINY_CASES, ids=[c[0] for c in TINY_CASES])
def test_tiny_parity_both_key_forms(tmp_path, name, overrides, with_projection, pad):
    ref_model = build_reference({**TINY, **overrides}, with_projection)
    ref_dir = tmp_path / "saved"
    ref_model.save_pretrained(ref_dir)
    ids = prompt_ids([5, 11], total=20, pad=pad)
    ref = reference_outputs(ref_model, ids)

    saved = read_safetensors(ref_dir)
    # What transformers 5 writes: CLIPTextModel drops the `text_model.` prefix, the projection model keeps it.
    assert any(k.startswith("text_model.") for k in saved) == with_projection
    ours = load_ours(ref_dir)
    assert ours.config.with_projection == with_projection
    assert_outputs_close(our_outputs(ours, ids), ref, TINY_ATOL, TINY_RTOL, f"{name} (saved keys)")

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "config.json").write_text((ref_dir / "config.json").read_text())
    mx.save_safetensors(str(other_dir / "model.safetensors"), other_key_form(saved))
    assert_outputs_close(our_outputs(load_ours(other_dir), ids), ref, TINY_ATOL, TINY_RTOL, f"{name} (other keys)")


@pytest.mark.parametrize("eos", [2, 500], ids=["legacy_argmax", "first_eos"])
def test_tiny_parity_pooling_rule(tmp_path, eos):
    """eos_token_id == 2 (legacy configs) pools at the highest id; any other value at the first EOS."""
    ref_model = build_reference({**TINY, "vocab_size": 1000, "eos_token_id": eos}, with_projection=True)
    ref_model.save_pretrained(tmp_path)
    ids = np.array([[1, 900, 7, eos, 950, eos, 3], [1, eos, 999, 5, eos, 0, 0]], dtype=np.int64)
    assert (ids.argmax(-1) != (ids == eos).argmax(-1)).all()  # the two rules disagree on these ids
    ours = load_ours(tmp_path)
    ref = reference_outputs(ref_model, ids)
    assert_outputs_close(our_outputs(ours, ids), ref, TINY_ATOL, TINY_RTOL, f"pooling eos_token_id={eos}")


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    ref_model = build_reference({**TINY, "hidden_act": "gelu"}, with_projection=True)
    ref_model.save_pretrained(tmp_path)
    weights = read_safetensors(tmp_path)
    del weights["text_model.encoder.layers.1.mlp.fc2.bias"]
    weights["text_model.encoder.layers.1.mlp.fc3.weight"] = mx.zeros((4, 4))
    model = CLIPTextModel(CLIPTextConfig.from_dict(read_json(tmp_path / "config.json")))
    with pytest.raises(ModelLoadError) as err:
        load_strict(model, sanitize(weights), "text_encoder_2")
    assert "text_model.encoder.layers.1.mlp.fc2.bias" in str(err.value)
    assert "text_model.encoder.layers.1.mlp.fc3.weight" in str(err.value)


def test_config_from_real_configs():
    sd15 = CLIPTextConfig.from_dict(real_config(SD15, "text_encoder"))
    sd21 = CLIPTextConfig.from_dict(real_config(SD21, "text_encoder"))
    sdxl2 = CLIPTextConfig.from_dict(real_config(SDXL, "text_encoder_2"))
    assert (sd15.hidden_size, sd15.num_hidden_layers, sd15.hidden_act, sd15.with_projection) == (
        768,
        12,
        "quick_gelu",
        False,
    )
    assert (sd21.hidden_size, sd21.num_hidden_layers, sd21.hidden_act, sd21.with_projection) == (
        1024,
        23,
        "gelu",
        False,
    )
    assert (sdxl2.hidden_size, sdxl2.num_hidden_layers, sdxl2.projection_dim, sdxl2.with_projection) == (
        1280,
        32,
        1280,
        True,
    )
    assert sd15.eos_token_id == sd21.eos_token_id == sdxl2.eos_token_id == 2


# Full size, float32: 12-32 layers of 768-1280 wide matmuls round differently in MLX and torch (observed max abs
# diff 3e-6..7e-6 on outputs up to |4.5|); atol 1e-4 + rtol 1e-4 leaves room for other BLAS builds, while any
# wrong op (activation, norm eps, mask, pooling position) gives O(0.1..1) errors.
FULL_ATOL = FULL_RTOL = 1e-4
FULL_CASES = [(SD15, "text_encoder", EOS), (SD21, "text_encoder", 0), (SDXL, "text_encoder_2", 0)]


@pytest.mark.fullsize
@pytest.mark.parametrize("model, component, pad", FULL_CASES, ids=["sd15", "sd21", "sdxl_2"])
def test_fullsize_parity(model, component, pad):
    start = time.perf_counter()
    config_dict = real_config(model, component)
    with_projection = "CLIPTextModelWithProjection" in config_dict["architectures"]
    ref_model = build_reference(config_dict, with_projection)
    ids = prompt_ids([7, 30], total=77, pad=pad)
    ref = reference_outputs(ref_model, ids)
    weights = {k: to_mx(v) for k, v in ref_model.state_dict().items()}
    del ref_model
    gc.collect()

    ours = load_strict(CLIPTextModel(CLIPTextConfig.from_dict(config_dict)), sanitize(weights), component)
    del weights
    assert_outputs_close(our_outputs(ours, ids), ref, FULL_ATOL, FULL_RTOL, f"{model}/{component}")
    print(f"{model}/{component}: {time.perf_counter() - start:.1f}s")
