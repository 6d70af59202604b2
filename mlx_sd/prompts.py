"""A1111-style prompts: attention weights `(word:1.3)` and prompts longer than 75 tokens.

Follows AUTOMATIC1111 stable-diffusion-webui: modules/prompt_parser.py `parse_prompt_attention`,
modules/sd_hijack_clip.py `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` / `process_tokens`
and modules/sd_emphasis.py `EmphasisOriginal` (prompt editing is not handled). A textual-inversion embedding's
n vectors take n token positions in one chunk (the tokenizer's `embedding_lengths`). A prompt becomes n chunks
of 77 ids (BOS + 75 tokens + EOS, padded) with one weight per id, and its encoding is

    concat_k apply_weights(text_encoder(ids[k]), weights[k])    # along the token axis: (1, 77 * n, C)

i.e. each chunk goes through the text encoder on its own and is weighted on its own, as A1111 does.
"""

import math
import re
import warnings
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

ROUND, SQUARE = 1.1, 1 / 1.1  # the multipliers of `(...)` and `[...]`
# One lexical token of the attention syntax, tried in this order (A1111's `re_attention`):
# an escape `\(` `\)` `\[` `\]` `\\` or a lone `\`, an opening bracket, `:number)` closing a round
# bracket with an explicit weight, a closing bracket, a run of plain text, a lone `:`. A1111 takes any
# `[.\d]+` as the number and fails on `(a:1.2.3)`; here that is text closed by `)` (x1.1).
ATTENTION = re.compile(
    r"""
    \\[()\[\]\\] | \\
    | [(\[]
    | :(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text):
    """'a (b:1.3) [c]' -> [('a ', 1.0), ('b', 1.3), (' ', 1.0), ('c', 1/1.1)]; BREAK -> ('BREAK', -1).

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:w)` multiplies by w; brackets left open are
    closed at the end, unmatched closing brackets are text, `\\(` `\\)` `\\[` `\\]` `\\\\` are literals.
    Neighbours with equal weights are merged; an empty prompt gives [('', 1.0)].
    """
    pieces = []  # [text, weight] lists, weights multiplied in place as brackets close
    open_round, open_square = [], []

    def multiply(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in ATTENTION.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            multiply(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            multiply(open_square.pop(), SQUARE)
        else:  # text, including unmatched `)`, `]` and `:1.3)`
            for i, part in enumerate(BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in open_round:
        multiply(start, ROUND)
    for start in open_square:
        multiply(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    for text, weight in pieces:
        if not math.isfinite(weight):
            raise ValueError(f"prompt weight of {text.strip()[:40]!r} is not a finite number")

    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


@dataclass
class PromptChunks:
    """A prompt as n chunks of BOS + 75 tokens + EOS + padding, each id with its attention weight."""

    ids: np.ndarray  # (n_chunks, 77) int32
    weights: np.ndarray  # (n_chunks, 77) float32, 1.0 for BOS/EOS/padding
    empty: np.ndarray  # (77,) int32 ids of the empty prompt, for pad_chunks

    def __len__(self):
        return len(self.ids)


def _split_chunks(tokenizer, text, chunk_size, comma_backtrack):
    """A1111 `tokenize_line`: [(tokens, weights)] with at most chunk_size tokens each, no BOS/EOS; an embedding
    that does not fit in the current chunk starts the next one."""
    comma = tokenizer.vocab.get(",</w>")
    chunks, tokens, weights, last_comma = [], [], [], -1

    def close():
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for piece, weight in parse_prompt_attention(text):
        if piece == "BREAK" and weight == -1:
            close()
            continue
        ids = tokenizer.tokenize(piece)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(tokens)
            elif (
                comma_backtrack
                and len(tokens) == chunk_size
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):  # a full chunk with a comma near its end: what follows the comma moves on
                cut = last_comma + 1
                tail = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = tail
            if len(tokens) == chunk_size:
                close()
            n = tokenizer.embedding_lengths.get(token, 1)  # an embedding's vectors stay in one chunk
            if len(tokens) + n > chunk_size:
                close()
            tokens += ids[position : position + n]
            weights += [weight] * n
            position += n
    if tokens or not chunks:
        close()
    return chunks


def _row(tokenizer, tokens, chunk_size):
    """BOS + tokens + EOS..., then (A1111 `process_tokens`) pad ids after the first EOS."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    row = np.array([bos, *tokens] + [eos] * (chunk_size + 1 - len(tokens)), dtype=np.int32)
    if pad != eos:  # SD 2.x pads with "!" (SD 1.x pads with EOS)
        first_eos = int(np.argmax(row == eos))
        row[first_eos + 1 :] = pad
    return row


def count_chunks(tokenizer, text, chunk_size=75, comma_backtrack=20):
    """The number of chunks chunk_prompt makes of `text`."""
    return len(_split_chunks(tokenizer, text, chunk_size, comma_backtrack))


def chunk_prompt(tokenizer, text, chunk_size=75, truncate=False, comma_backtrack=20):
    """Tokenizes an A1111 prompt into chunks of chunk_size tokens (+ BOS/EOS).

    A new chunk starts after chunk_size tokens or at BREAK; when a chunk fills up and its last comma
    is at most comma_backtrack tokens back, the tokens after that comma move to the next chunk
    (comma_backtrack=0 turns this off). truncate=True keeps the first chunk only and warns.
    """
    split = _split_chunks(tokenizer, text, chunk_size, comma_backtrack)
    if truncate and len(split) > 1:
        cut = [t for tokens, _ in split[1:] for t in tokens]
        warnings.warn(f"Prompt longer than one chunk; cut off: {tokenizer.decode(cut)!r}", stacklevel=3)
        split = split[:1]
    ids = np.stack([_row(tokenizer, tokens, chunk_size) for tokens, _ in split])  # (n, chunk_size + 2)
    weights = np.ones(ids.shape, dtype=np.float32)
    for row, (_, w) in zip(weights, split):
        row[1 : 1 + len(w)] = w
    return PromptChunks(ids, weights, _row(tokenizer, [], chunk_size))


def pad_chunks(chunks, n):
    """Extends chunks with empty-prompt chunks (weights 1.0) up to n chunks, e.g. a negative prompt."""
    if n < len(chunks):
        raise ValueError(f"Cannot pad {len(chunks)} prompt chunks down to {n}")
    empty = np.tile(chunks.empty, (n - len(chunks), 1))  # (n - len, 77)
    ids = np.concatenate([chunks.ids, empty])
    weights = np.concatenate([chunks.weights, np.ones(empty.shape, dtype=np.float32)])
    return PromptChunks(ids, weights, chunks.empty)


def apply_weights(hidden, weights):
    """A1111 "Original" emphasis: z * w, rescaled so that each chunk keeps its mean.

    hidden: (..., 77, C) text-encoder output of one or more chunks; weights: (..., 77). The mean is taken
    over each whole chunk (its 77 x C values), as A1111 does once per chunk of a single prompt.
    """
    z = hidden.astype(mx.float32)
    original_mean = z.mean(axis=(-2, -1), keepdims=True)
    z = z * mx.array(weights, dtype=mx.float32)[..., None]
    z = z * (original_mean / z.mean(axis=(-2, -1), keepdims=True))
    return z.astype(hidden.dtype)
