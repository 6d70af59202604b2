"""CLIP byte-level BPE tokenizer, id for id equal to transformers' (5.x) `CLIPTokenizer`.

The pipeline follows transformers/models/clip/tokenization_clip.py (a `tokenizers` backend):
added tokens are split off (first on the raw text, then on the normalized text), the rest is
normalized (NFC, whitespace runs -> " ", per-character lowercase), split with the CLIP regex and
then the GPT-2 regex of the ByteLevel pre-tokenizer, and each word is BPE-encoded with `</w>`.
Textual-inversion words (`set_embedding_tokens`) are split off the normalized text before BPE.
"""

import json
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

ASSETS = Path(__file__).parent / "assets" / "clip_tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The ByteLevel pre-tokenizer splits each piece again; this only matters for `<|startoftext|>`-like pieces.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode():
    """The GPT-2 map from the 256 byte values to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes map to themselves
    return dict(zip(bs, map(chr, cs)))


def normalize(text):
    """NFC, whitespace runs -> one space, lowercase one character at a time (no final-sigma rule)."""
    text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def _splitter(tokens):
    """A function splitting text on the added tokens (leftmost-longest): [(piece, None) | (token, id)]."""
    if not tokens:
        return lambda text: [(text, None)]
    pattern = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")
    return lambda text: [(p, tokens[p] if i % 2 else None) for i, p in enumerate(pattern.split(text)) if p]


class CLIPTokenizer:
    """CLIP BPE tokenizer: `tok(texts)` -> int32 (B, max_length) ids, BOS + text + EOS + padding."""

    def __init__(self, vocab_path, merges_path, pad_token=EOS, max_length=77, added_tokens=None):
        self.vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token_id, self.eos_token_id = self.vocab[BOS], self.vocab[EOS]
        self.pad_token_id = self.vocab[pad_token]
        self.max_length = max_length
        # content -> normalized flag, as transformers registers them (a later definition wins)
        if added_tokens is None:
            added_tokens = {BOS: False, EOS: False, pad_token: False}
        self.split_raw = _splitter({t: self.vocab[t] for t, norm in added_tokens.items() if not norm})
        self.split_normalized = _splitter({t: self.vocab[t] for t, norm in added_tokens.items() if norm})
        self.bpe = lru_cache(maxsize=1 << 16)(self._bpe)
        self.set_embedding_tokens({})

    def set_embedding_tokens(self, tokens):
        """Textual-inversion words: {token: ids}. A token written as a word of a prompt (any case, not inside a
        longer word) becomes its ids, taken before BPE; `embedding_lengths` maps an embedding's first id to its
        number of ids, which stay together in one prompt chunk."""
        self.embedding_tokens = {normalize(t): list(ids) for t, ids in tokens.items()}
        self.embedding_lengths = {ids[0]: len(ids) for ids in self.embedding_tokens.values()}
        self.embedding_words = {ids[0]: t for t, ids in tokens.items()}
        words = "|".join(map(regex.escape, sorted(self.embedding_tokens, key=len, reverse=True)))
        self.embedding_pattern = (
            regex.compile(rf"(?<![\p{{L}}\p{{N}}])({words})(?![\p{{L}}\p{{N}}])") if words else None
        )

    def split_embeddings(self, text):
        """[(piece, None) | (token, ids)]: text split on the embeddings' words."""
        if self.embedding_pattern is None:
            return [(text, None)]
        pieces = self.embedding_pattern.split(text)
        return [(p, self.embedding_tokens[p] if i % 2 else None) for i, p in enumerate(pieces) if p]

    @classmethod
    def from_folder(cls, folder):
        """Reads a diffusers `tokenizer` folder the way transformers' `from_pretrained` resolves it.

        Special tokens: tokenizer_config.json, overridden by special_tokens_map.json in legacy folders
        (SD 2.x: pad "!"); their matching flags come from `added_tokens_decoder` or tokenizer.json.
        Missing vocab.json/merges.txt fall back to the bundled (standard CLIP) ones; a missing folder is an error
        (its special tokens say the pad token, which differs between SD 1.x and SD 2.x).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no tokenizer folder {folder}")
        files = [folder / f if (folder / f).is_file() else ASSETS / f for f in ("vocab.json", "merges.txt")]
        config = _read_json(folder / "tokenizer_config.json")
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}  # class defaults
        specials.update({k: config[k] for k in specials if k in config})
        if "added_tokens_decoder" in config:
            known = list(config["added_tokens_decoder"].values())
        else:
            specials.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if k in specials})
            known = _read_json(folder / "tokenizer.json").get("added_tokens", [])
        known = {t["content"]: t for t in known}
        added = {c: t.get("normalized", not t.get("special", False)) for c, t in known.items()}
        for key, token in specials.items():  # registered in this order, a later definition wins
            token = {"content": token} if isinstance(token, str) else token
            specials[key] = token = known.get(token["content"], token)
            added[token["content"]] = token.get("normalized", False)  # special tokens default to raw matching
        max_length = config.get("model_max_length", 77)
        return cls(*files, specials["pad_token"]["content"], max_length, added_tokens=added)

    def _bpe(self, word):
        """BPE of one pre-token (already byte-encoded) -> ids; lowest-rank pair merged first."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.vocab[p] for p in parts)

    def tokenize(self, text):
        """BPE ids of text, without BOS/EOS and without truncation."""
        ids = []
        for raw, raw_id in self.split_raw(text):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for piece, piece_id in self.split_normalized(normalize(raw)):
                if piece_id is not None:
                    ids.append(piece_id)
                    continue
                for part, embedding_ids in self.split_embeddings(piece):
                    if embedding_ids is not None:
                        ids.extend(embedding_ids)
                        continue
                    for word in CLIP_PATTERN.findall(part):
                        for sub in GPT2_PATTERN.findall(word):
                            ids.extend(self.bpe("".join(self.byte_encoder[b] for b in sub.encode("utf-8"))))
        return ids

    def __call__(self, texts):
        """str or list[str] -> int32 (B, max_length): BOS + ids + EOS, truncated and padded."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int32)
        keep = self.max_length - 2
        for row, text in zip(out, texts):
            ids = self.tokenize(text)
            if len(ids) > keep:
                cut = self.decode(ids[keep:])
                warnings.warn(f"Prompt longer than {self.max_length} tokens; cut off: {cut!r}", stacklevel=2)
                ids = ids[:keep]
            ids = [self.bos_token_id] + ids + [self.eos_token_id]
            row[: len(ids)] = ids
        return out

    def decode(self, ids):
        """ids -> text, like transformers' `decode` (special tokens kept, `</w>` -> space, stripped); an embedding's
        ids give its word once."""
        text = "".join(self.id_to_token.get(int(i), self._embedding_piece(int(i))) for i in ids)
        data = bytes(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def _embedding_piece(self, i):
        word = self.embedding_words.get(i)
        return "" if word is None else "".join(self.byte_encoder[b] for b in word.encode("utf-8")) + "</w>"


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
