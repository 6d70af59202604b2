"""Textual-inversion embeddings (A1111, diffusers, SDXL, multi-vector) used by mlx_sd and by diffusers'
`load_textual_inversion` on the same tiny random pipelines.

Tolerance (float32, same initial latents): final 8-bit images within 0.5/255 mean and 2/255 max absolute difference
(helpers.assert_images_close); each embedding changes the image by far more than that (asserted).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_images_close, make_pipeline, run_both
from mlx_sd import StableDiffusion
from mlx_sd.adapter_files import describe_adapter
from mlx_sd.pipeline import Freed
from mlx_sd.prompts import chunk_prompt
from mlx_sd.quantize import quantize_model
from mlx_sd.weights import ModelLoadError

PROMPT = "{0}, {0}"  # the embedding twice, and nothing else: its effect on the tiny UNet is large


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """family -> (diffusers pipeline, mlx_sd pipeline); tests leave both without embeddings."""
    cache, folders = {}, {}

    def get(family):
        if family not in cache:
            folder = folders[family] = tmp_path_factory.mktemp(family)
            reference = make_pipeline(family, folder)
            cache[family] = (reference, StableDiffusion.from_pretrained(folder, dtype="float32"))
        return cache[family]

    get.folders = folders
    return get


def vectors(n, dim=32, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 4


def run(reference, ours, token):
    return run_both(reference, ours, "euler", 48, 48, 3, 12.0, prompt=PROMPT.format(token))


def assert_changed(images, plain):
    change = np.abs(images - plain)
    print(f"the embedding changes the image by mean {change.mean():.2f}/255, max {change.max():.0f}/255")
    assert change.mean() > 2 and change.max() > 20  # 4 and 10 times the tolerance


CASES = [
    # family, file name, tensors, token given to load_textual_inversion (None: the default)
    ("sd1", "charturner.safetensors", {"emb_params": vectors(1)}, None),
    ("sd1", "bad-hands-5.safetensors", {"emb_params": vectors(6, seed=1)}, None),
    ("sd2v", "learned_embeds.safetensors", {"<cat-toy>": vectors(2, seed=2)}, None),
    ("sd2v", "emb.safetensors", {"string_to_param.*": vectors(3, seed=3)}, "my-emb"),
    ("sdxl", "xlstyle.safetensors", {"clip_l": vectors(3, seed=4), "clip_g": vectors(3, seed=5)}, None),
]


@pytest.mark.parametrize("family,name,tensors,token", CASES, ids=[c[1] for c in CASES])
def test_embeddings_match_diffusers(pipelines, tmp_path, family, name, tensors, token):
    reference, ours = pipelines(family)
    path = tmp_path / name
    save_file(tensors, path)
    loaded = ours.load_textual_inversion(path, token=token)
    word = token or (next(iter(tensors)) if name == "learned_embeds.safetensors" else path.stem)
    assert loaded == word
    if family == "sdxl":
        for key, encoder, tokenizer in (
            ("clip_l", "text_encoder", "tokenizer"),
            ("clip_g", "text_encoder_2", "tokenizer_2"),
        ):
            reference.load_textual_inversion(
                tensors[key],
                token=word,
                text_encoder=getattr(reference, encoder),
                tokenizer=getattr(reference, tokenizer),
            )
    else:
        reference.load_textual_inversion(str(path), token=word)
    try:
        images, expected = run(reference, ours, word)
        assert_images_close(images, expected)
        ours.unload_textual_inversion(word)
        assert_changed(images, run(reference, ours, "plain")[0])
    finally:
        reference.unload_textual_inversion()
        ours.unload_textual_inversion()


def test_vectors_take_their_positions_and_weights(pipelines, tmp_path):
    """A1111: an n-vector embedding takes n positions of one 75-token chunk (one that does not fit starts the next
    chunk) and takes the weight of `(word:1.3)`."""
    _, ours = pipelines("sd1")
    save_file({"emb_params": vectors(4)}, tmp_path / "Quad.safetensors")
    ours.load_textual_inversion(tmp_path / "Quad.safetensors")
    tokenizer = ours.tokenizer
    try:
        first = ours.text_encoder.config.vocab_size  # the embeddings' ids follow the vocabulary
        quad = list(range(first, first + 4))
        chunks = chunk_prompt(tokenizer, "a (quad:1.3) cat")
        assert list(chunks.ids[0, 1:7]) == [tokenizer.vocab["a</w>"], *quad, tokenizer.vocab["cat</w>"]]
        assert list(chunks.weights[0, 1:7]) == pytest.approx([1, 1.3, 1.3, 1.3, 1.3, 1])
        chunks = chunk_prompt(tokenizer, "cat " * 73 + "QUAD dog")
        assert len(chunks) == 2 and list(chunks.ids[0, 72:76]) == [tokenizer.vocab["cat</w>"]] * 2 + [49407] * 2
        assert list(chunks.ids[1, 1:6]) == [*quad, tokenizer.vocab["dog</w>"]]
        # a word that merely contains the token is left alone; the decoded text names the embedding
        assert first not in tokenizer.tokenize("quadruple quads")
        assert tokenizer.decode(tokenizer.tokenize("a quad, quad")) == "a Quad , Quad"
    finally:
        ours.unload_textual_inversion()


def test_quantized_token_embedding_keeps_vectors_apart(pipelines, tmp_path):
    """With a quantized token embedding the embedding's vectors are looked up on their own, unrounded."""
    pipelines("sd1")
    pipe = StableDiffusion.from_pretrained(pipelines.folders["sd1"], dtype="float32")
    quantize_model(pipe.text_encoder, 8, 32)
    embeddings = pipe.text_encoder.text_model.embeddings
    assert "scales" in embeddings.token_embedding
    v = vectors(2)
    save_file({"emb_params": v}, tmp_path / "duo.safetensors")
    pipe.load_textual_inversion(tmp_path / "duo.safetensors")
    ids = mx.array(chunk_prompt(pipe.tokenizer, "a duo").ids)
    out = np.array(embeddings(ids))
    position = np.array(embeddings.position_embedding.weight)
    np.testing.assert_array_equal(out[0, 2:4], v.numpy() + position[2:4])
    plain = np.array(embeddings.token_embedding(ids[:, :2])) + position[:2]
    np.testing.assert_array_equal(out[0, :2], plain[0])


def test_low_memory_reapplies_embeddings(pipelines, tmp_path):
    _, ours = pipelines("sd1")
    low = StableDiffusion.from_pretrained(pipelines.folders["sd1"], dtype="float32", low_memory=True)
    save_file({"emb_params": vectors(2, seed=9)}, tmp_path / "duo.safetensors")
    latents = mx.array(np.random.default_rng(0).standard_normal((1, 6, 6, 4)).astype(np.float32))

    def image(pipe):
        out = pipe.generate(PROMPT.format("duo"), width=48, height=48, steps=2, seed=0, latents=latents)
        return np.asarray(out[0], np.float64)

    for pipe in (low, ours):
        pipe.load_textual_inversion(tmp_path / "duo.safetensors")
    try:
        first = image(low)
        assert isinstance(low.text_encoder, Freed)
        assert np.array_equal(image(low), first)
        assert_images_close(first, image(ours))
    finally:
        ours.unload_textual_inversion()


BAD = [
    # (what, file name, tensors, family, error)
    (
        "SD 2.x width on SD 1.x",
        "wide.safetensors",
        {"emb_params": vectors(2, 1024)},
        "sd1",
        r"wide.safetensors has 1024-wide vectors \(SD 2.x\); this model's text_encoder takes 32",
    ),
    (
        "SDXL file on SD 1.x",
        "xl.safetensors",
        {"clip_l": vectors(1), "clip_g": vectors(1)},
        "sd1",
        r"is an SDXL embedding \(clip_l \+ clip_g\); this model has one text encoder",
    ),
    ("SD 1.x file on SDXL", "one.safetensors", {"emb_params": vectors(1)}, "sdxl", r"SDXL needs clip_l and clip_g"),
    ("NaN", "nan.safetensors", {"emb_params": torch.full((1, 32), float("nan"))}, "sd1", "NaN or infinite"),
    ("76 vectors", "long.safetensors", {"emb_params": vectors(76)}, "sd1", r"1 <= n <= 75, got \(76, 32\)"),
    ("not an embedding", "lora.safetensors", {"a": vectors(1), "b": vectors(1)}, "sd1", "not a textual-inversion"),
    ("a space in the token", "my style.safetensors", {"emb_params": vectors(1)}, "sd1", "cannot be a word"),
    ("brackets in the token", "(x).safetensors", {"emb_params": vectors(1)}, "sd1", "cannot be a word"),
]


@pytest.mark.parametrize("what,name,tensors,family,error", BAD, ids=[b[0] for b in BAD])
def test_bad_embeddings_are_one_line_errors(pipelines, tmp_path, what, name, tensors, family, error):
    _, ours = pipelines(family)
    save_file(tensors, tmp_path / name)
    with pytest.raises((ModelLoadError, ValueError), match=error) as info:
        ours.load_textual_inversion(tmp_path / name)
    assert "\n" not in str(info.value) and not ours.adapters.embeddings


def test_pickle_and_corrupt_files_are_refused(pipelines, tmp_path):
    _, ours = pipelines("sd1")
    (tmp_path / "old.pt").write_bytes(b"anything")
    with pytest.raises(ModelLoadError, match="mlx_sd never unpickles"):
        ours.load_textual_inversion(tmp_path / "old.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x08")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        ours.load_textual_inversion(tmp_path / "cut.safetensors")


def test_reloading_a_token_replaces_it(pipelines, tmp_path):
    _, ours = pipelines("sd1")
    save_file({"emb_params": vectors(3)}, tmp_path / "Style.safetensors")
    save_file({"emb_params": vectors(1)}, tmp_path / "other.safetensors")
    ours.load_textual_inversion(tmp_path / "Style.safetensors")
    ours.load_textual_inversion(tmp_path / "other.safetensors", token="STYLE")
    try:
        assert list(ours.adapters.embeddings) == ["STYLE"]
        assert ours.tokenizer.tokenize("style") == [len(ours.tokenizer.vocab)]
    finally:
        ours.unload_textual_inversion()


def test_describe_embeddings(tmp_path):
    save_file({"emb_params": vectors(8, 768)}, tmp_path / "EasyNegative.safetensors")
    assert describe_adapter(tmp_path / "EasyNegative.safetensors") == [
        "format: textual-inversion embedding (A1111)",
        "token: EasyNegative",
        "vectors: 8",
        "dims: 768 (SD 1.x)",
    ]
    save_file({"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)}, tmp_path / "xl.safetensors")
    assert describe_adapter(tmp_path / "xl.safetensors")[2:] == ["vectors: 2", "dims: clip_l 768, clip_g 1280 (SDXL)"]
