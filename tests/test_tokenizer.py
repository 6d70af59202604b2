"""Parity of mlx_sd.tokenizer.CLIPTokenizer with transformers' CLIPTokenizer (ids must be identical)."""

import gzip
import importlib.util
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from transformers import CLIPTokenizer as HFCLIPTokenizer

from helpers import SD15, SD21, SDXL, TOKENIZER_ASSETS, write_tokenizer
from mlx_sd.tokenizer import CLIPTokenizer

FOLDERS = [(SD15, "tokenizer", 49407), (SD21, "tokenizer", 0), (SDXL, "tokenizer_2", 0)]

SUBJECTS = [
    "a photo of an astronaut riding a horse on mars",
    "portrait of a woman, oil painting",
    "a cat",
    "cyberpunk city at night, neon lights",
    "a bowl of ramen",
    "an old lighthouse in a storm",
    "Mount Fuji at sunrise",
    "a red fox in the snow",
    "a cozy cabin interior",
    "a steampunk robot",
]
STYLES = [
    "",
    ", 4k, trending on artstation",
    ", highly detailed, 8k uhd, dslr, soft lighting",
    ", by greg rutkowski and alphonse mucha",
    " (masterpiece:1.2), best quality, ((sharp focus))",
    ", [blurry], cinematic lighting!!!",
    " | studio ghibli style | anime",
]
SPECIAL_CASES = [
    "",
    " ",
    "   \t\n  ",
    "A",
    "UPPER CASE PROMPT WITH NUMBERS 1234567890",
    "café naïve résumé Ångström São Paulo Zürich",
    "e\u0301cole (decomposed accent)",
    "ΣΑΣ σς İstanbul straße ﬁne",  # final sigma, dotted capital I, ligature
    "東京タワーの夜景、美しい",
    "一只可爱的猫在花园里",
    "한국어 프롬프트 테스트",
    "Привет, мир! Ёжик",
    "مرحبا بالعالم",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "🐱🎨🔥 emoji 👩‍🚀 astronaut 🏳️‍🌈 flag",
    "fullwidth ＡＢＣ１２３！",
    "!!!",
    "!?!?...,,,;;;",
    "wow!!! amazing!! great!",
    "hello ! world !",
    "---===***###@@@",
    "(((((((word)))))))",
    "a\tb\nc\r\nd  e\u00a0f\u3000g\u2028h\x85i\x0bj\x0ck",  # whitespace runs of every kind
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "\x1c\x1d\x1e\x1f controls",
    "3.14159 2,718 1e10 007 100% $5.99 #1 v2.1",
    "don't it's we'll they're I'm you've he'd DON'T IT'S",
    "'s 't 're 'salad' 'hello' rock'n'roll",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39; &nbsp;",
    "<|startoftext|> a <|endoftext|> b",
    "<|ENDOFTEXT|> <|StartOfText|> <|endoftext",
    "<|endoftext|>\u0338 <\u0338 =\u0338",  # NFC would compose ">" + U+0338 across a raw-matched token
    "<html><body>tags</body></html>",
    "https://example.com/path?q=1&r=2",
    "snake_case camelCase kebab-case",
    "a" * 300,
    "word " * 100,
    "a photo of a cat, " * 20,
    "🐱" * 40,
    "!" * 100,
    "東京" * 60,
]


def _prompts():
    """A deterministic list of > 200 prompts: templates, hand-picked edge cases and random mixtures."""
    prompts = [s + style for s in SUBJECTS for style in STYLES] + SPECIAL_CASES
    pool = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     \t\n!?.,;:'\"()[]{}<>|-_*&#%")
    pool += list("éèàüöçñßøåÉÜŒœæ東京猫花한글ПриветΣσς🐱🎨👩‍🚀\u0301\u00a0\u3000\u200b")
    rng = random.Random(0)
    words = [w for s in SUBJECTS for w in s.split()]
    for _ in range(90):  # mixtures of characters
        prompts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 120))))
    for _ in range(40):  # shuffled words with random casing and punctuation
        ws = [rng.choice(words) for _ in range(rng.randint(1, 90))]
        ws = [w.upper() if rng.random() < 0.2 else w + rng.choice(["", ",", "!", "'s", "..."]) for w in ws]
        prompts.append(" ".join(ws))
    return prompts


PROMPTS = _prompts()


@pytest.fixture(scope="module", params=FOLDERS, ids=lambda f: f"{f[0]}/{f[1]}")
def tokenizer_pair(request, tmp_path_factory):
    model, component, pad_id = request.param
    folder = write_tokenizer(model, tmp_path_factory.mktemp("tok") / component, component)
    return HFCLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_folder(folder), pad_id


def _open_clip_vocab():
    """CLIP's vocabulary rebuilt from open_clip's bpe_simple_vocab_16e6.txt.gz (open_clip's own recipe)."""
    folder = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    with gzip.open(folder / "bpe_simple_vocab_16e6.txt.gz") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_chars = [chr(c) for c in bs + [256 + n for n in range(256 - len(bs))]]  # bytes_to_unicode().values()
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def test_bundled_vocab_is_the_clip_vocab():
    vocab, merges = _open_clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert json.loads((TOKENIZER_ASSETS / "vocab.json").read_text(encoding="utf-8")) == vocab
    bundled = (TOKENIZER_ASSETS / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert bundled[0].startswith("#version") and bundled[1:] == merges


def test_special_token_ids(tokenizer_pair):
    hf, ours, pad_id = tokenizer_pair
    assert len(PROMPTS) >= 200
    assert ours.pad_token_id == hf.pad_token_id == pad_id  # SD 1.x: <|endoftext|>; SD 2.x / SDXL tokenizer_2: "!"
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (49406, 49407)
    assert ours.max_length == hf.model_max_length == 77


def test_ids_match_transformers(tokenizer_pair):
    hf, ours, _ = tokenizer_pair
    ref = np.array(hf(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(PROMPTS)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
    for prompt, r, g in zip(PROMPTS, ref, got):  # exact equality: token ids are discrete
        np.testing.assert_array_equal(g, r, err_msg=repr(prompt))


def test_tokenize_matches_transformers_without_special_tokens(tokenizer_pair):
    hf, ours, _ = tokenizer_pair
    ref = hf(PROMPTS, add_special_tokens=False)["input_ids"]
    for prompt, r in zip(PROMPTS, ref):
        assert ours.tokenize(prompt) == r, repr(prompt)
    assert max(len(r) for r in ref) > 150  # long prompts are compared untruncated


def test_truncation_warning_names_the_cut_off_text(tokenizer_pair):
    hf, ours, _ = tokenizer_pair
    exact = "cat " * 75  # 75 tokens + BOS + EOS fit exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = ours(exact)
    ref = hf(exact, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids[0], ref)
    with pytest.warns(UserWarning, match=r"cut off: 'dog bird'"):
        ids = ours(exact + "dog bird")
    assert ids[0, -1] == ours.eos_token_id and ids[0, -2] == ours.vocab["cat</w>"]


def test_decode_round_trip(tokenizer_pair):
    hf, ours, _ = tokenizer_pair
    text = "a photo of an astronaut riding a horse on mars with a very long tail"
    ids = ours.tokenize(text)
    assert ours.decode(ids) == text == hf.decode(ids)


def test_folder_saved_by_transformers_without_vocab_files(tmp_path):
    """transformers 5 saves tokenizer.json only: the bundled vocab is used, flags come from tokenizer.json."""
    HFCLIPTokenizer.from_pretrained(write_tokenizer(SD21, tmp_path / "src")).save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vocab.json").exists()
    hf = HFCLIPTokenizer.from_pretrained(tmp_path / "saved")
    ours = CLIPTokenizer.from_folder(tmp_path / "saved")
    prompts = SPECIAL_CASES
    ref = np.array(hf(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ours(prompts), ref)
    assert ours.pad_token_id == 0
