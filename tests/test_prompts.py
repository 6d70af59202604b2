"""A1111 prompt syntax and chunking (mlx_sd/prompts.py).

Expected parses are written by hand from A1111's rules (wiki "Features: Attention/emphasis" and the
`parse_prompt_attention` docstring in modules/prompt_parser.py), not produced by our code.
"""

import mlx.core as mx
import numpy as np
import pytest

from helpers import SD15, SD21, write_tokenizer
from mlx_sd.prompts import apply_weights, chunk_prompt, pad_chunks, parse_prompt_attention
from mlx_sd.tokenizer import CLIPTokenizer

R, S = 1.1, 1 / 1.1  # one round / one square bracket

PARSES = [
    # the examples of A1111's docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * R * R),
            (" ", R),
            ("on", 1.0),
            (" a ", R),
            ("hill", 0.5 * R),
            (", sun, ", R),
            ("sky", R**4),
            (".", R),
        ],
    ),
    # nesting and explicit weights
    ("", [("", 1.0)]),
    ("((a))", [("a", R**2)]),
    ("(((a)))", [("a", R**3)]),
    ("[a]", [("a", S)]),
    ("[[a]]", [("a", S**2)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:0.25) b", [("a", 0.25), (" b", 1.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:2.)", [("a", 2.0)]),
    ("(a:+1.3)", [("a", 1.3)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("((a:1.3))", [("a", 1.3 * R)]),
    ("((a:1.3)", [("a", 1.3 * R)]),  # the outer bracket is closed at the end
    ("[(a:1.5)]", [("a", 1.5 * S)]),
    ("((a) b)", [("a", R**2), (" b", R)]),
    ("(a)[b]", [("a", R), ("b", S)]),
    ("a (b [c] d) e", [("a ", 1.0), ("b ", R), ("c", 1.0), (" d", R), (" e", 1.0)]),
    ("(a[b)c]", [("a", R), ("b", 1.0), ("c", S)]),  # brackets may interleave
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),  # equal neighbours merge
    ("(a:1.21)((b))", [("a", 1.21), ("b", 1.21)]),  # 1.1 * 1.1 != 1.21 in floats: no merge
    # what is not syntax stays text
    ("(a: 1.3)", [("a: 1.3", R)]),  # no space allowed before the number
    ("(a:1.3", [("a:1.3", R)]),
    ("a:1.3)", [("a:1.3)", 1.0)]),
    ("[a:1.3]", [("a:1.3", S)]),  # `[a:w]` is not a weight
    ("a:b", [("a:b", 1.0)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("[unbalanced", [("unbalanced", S)]),
    # escapes
    (r"\(a\)", [("(a)", 1.0)]),
    (r"(\(a\))", [("(a)", R)]),
    (r"\\", [("\\", 1.0)]),
    (r"a \b", [("a b", 1.0)]),  # a lone backslash is dropped
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1), ("a", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -R), ("b", R)]),  # weighted, BREAK is plain text again
]


@pytest.mark.parametrize("prompt,expected", PARSES)
def test_parse_prompt_attention(prompt, expected):
    got = parse_prompt_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    # weights are products of a few factors; 1e-12 only absorbs the order of the float products
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {m: CLIPTokenizer.from_folder(write_tokenizer(m, root / m)) for m in (SD15, SD21)}


@pytest.fixture(scope="module")
def tok(tokenizers):
    return tokenizers[SD15]


def token_id(tok, word):
    (token,) = tok.tokenize(word)
    return token


def row(tok, tokens):
    """BOS + tokens + EOS, then the tokenizer's padding: the expected 77 ids of one chunk."""
    out = [tok.bos_token_id, *tokens, tok.eos_token_id]
    return out + [tok.pad_token_id] * (77 - len(out))


@pytest.mark.parametrize("model", [SD15, SD21])
@pytest.mark.parametrize("text", ["a photo of an astronaut riding a horse on mars", "", "cat, " * 37 + "cat"])
def test_unweighted_prompt_equals_tokenizer(tokenizers, model, text):
    tok = tokenizers[model]
    chunks = chunk_prompt(tok, text)
    np.testing.assert_array_equal(chunks.ids, tok(text))  # 75 tokens at most: one chunk
    np.testing.assert_array_equal(chunks.weights, np.ones((1, 77), np.float32))


def test_weights_follow_tokens(tok):
    chunks = chunk_prompt(tok, "(cat:1.5) dog [cat]")
    cat, dog = token_id(tok, "cat"), token_id(tok, "dog")
    assert chunks.ids.tolist() == [row(tok, [cat, dog, cat])]
    expected = np.ones(77, np.float32)
    expected[1:4] = [1.5, 1.0, S]
    np.testing.assert_array_equal(chunks.weights[0], expected)


@pytest.mark.parametrize("model", [SD15, SD21])
def test_long_prompt_two_chunks(tokenizers, model):
    tok = tokenizers[model]
    cat = token_id(tok, "cat")
    assert chunk_prompt(tok, "cat " * 75).ids.tolist() == [row(tok, [cat] * 75)]
    chunks = chunk_prompt(tok, "(cat) " * 80)
    assert chunks.ids.tolist() == [row(tok, [cat] * 75), row(tok, [cat] * 5)]
    np.testing.assert_array_equal(chunks.weights[0, 1:76], np.full(75, R, np.float32))
    np.testing.assert_array_equal(chunks.weights[1, 1:6], np.full(5, R, np.float32))
    assert (chunks.weights[:, 0] == 1).all() and (chunks.weights[1, 6:] == 1).all()


def test_break_starts_a_new_chunk(tok):
    cat, dog = token_id(tok, "cat"), token_id(tok, "dog")
    assert chunk_prompt(tok, "cat BREAK dog").ids.tolist() == [row(tok, [cat]), row(tok, [dog])]
    assert chunk_prompt(tok, "cat BREAK").ids.tolist() == [row(tok, [cat])]  # an empty tail adds nothing
    assert chunk_prompt(tok, "BREAK cat").ids.tolist() == [row(tok, []), row(tok, [cat])]
    weighted = chunk_prompt(tok, "(cat BREAK dog)")  # inside brackets BREAK is only a word
    assert weighted.ids.tolist() == [row(tok, [cat, *tok.tokenize("BREAK"), dog])]


def test_comma_backtrack(tok):
    cat, dog, comma = token_id(tok, "cat"), token_id(tok, "dog"), token_id(tok, ",")
    prompt = "cat " * 70 + ", " + "dog " * 10  # the chunk fills up 5 tokens after the comma
    moved = [row(tok, [cat] * 70 + [comma]), row(tok, [dog] * 10)]
    assert chunk_prompt(tok, prompt).ids.tolist() == moved
    assert chunk_prompt(tok, prompt, comma_backtrack=5).ids.tolist() == moved  # the limit is inclusive
    kept = [row(tok, [cat] * 70 + [comma] + [dog] * 4), row(tok, [dog] * 6)]
    assert chunk_prompt(tok, prompt, comma_backtrack=0).ids.tolist() == kept
    assert chunk_prompt(tok, prompt, comma_backtrack=4).ids.tolist() == kept  # comma too far back


def test_pad_chunks(tokenizers):
    for tok in tokenizers.values():
        positive = chunk_prompt(tok, "cat " * 100)
        negative = chunk_prompt(tok, "(blurry:1.2)")
        padded = pad_chunks(negative, len(positive))
        np.testing.assert_array_equal(padded.ids, np.concatenate([negative.ids, tok("")]))
        np.testing.assert_array_equal(padded.weights[0], negative.weights[0])
        np.testing.assert_array_equal(padded.weights[1], np.ones(77, np.float32))
        with pytest.raises(ValueError):
            pad_chunks(positive, 1)


def test_truncate_keeps_first_chunk(tok):
    cat = token_id(tok, "cat")
    with pytest.warns(UserWarning, match="cut off: 'cat cat cat cat cat'"):
        chunks = chunk_prompt(tok, "(cat) " * 80, truncate=True)
    assert chunks.ids.tolist() == [row(tok, [cat] * 75)]
    np.testing.assert_array_equal(chunks.weights[0, 1:76], np.full(75, R, np.float32))


def reference_weights(hidden, weights):
    """numpy restatement of A1111 EmphasisOriginal, called once per chunk (sd_hijack_clip.forward)."""
    out = []
    for z, w in zip(hidden.astype(np.float64), weights):
        original_mean = z.mean()
        z = z * w[:, None]
        out.append(z * (original_mean / z.mean()))
    return np.stack(out)


def test_apply_weights_matches_a1111_formula():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 77, 32)).astype(np.float32) + 0.5
    weights = rng.uniform(0.5, 1.5, (3, 77)).astype(np.float32)
    ours = apply_weights(mx.array(hidden), weights)
    # float32 means over 77 x 32 values against a float64 reference: a few float32 ulps
    np.testing.assert_allclose(np.array(ours), reference_weights(hidden, weights), rtol=1e-5, atol=1e-5)
    assert apply_weights(mx.array(hidden, dtype=mx.float16), weights).dtype == mx.float16


def test_apply_weights_ones_is_identity():
    hidden = mx.array(np.random.default_rng(1).standard_normal((2, 77, 32)).astype(np.float32))
    np.testing.assert_array_equal(np.array(apply_weights(hidden, np.ones((2, 77), np.float32))), np.array(hidden))
