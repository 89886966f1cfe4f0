"""Text to the GPT's text token ids, from the bundle's tokenizer, as upstream does it
without its text normaliser.

IndexTTS-2 (``bpe.model``, SentencePiece; ``indextts/utils/front.py`` ``TextTokenizer``):

1. Upstream first runs ``TextNormalizer`` (WeTextProcessing for Chinese and English:
   numbers, dates, units and symbols spelled out, some punctuation mapped; needs the
   ``WeTextProcessing`` package and its FSTs).  The reference does not: give it text as
   you want it spoken.
2. A text whose stripped length is 1 is encoded as it is.  Otherwise it is split
   around every CJK character (the ranges of :data:`CJK`), each piece stripped and
   upper-cased, and the pieces joined with single spaces.
3. SentencePiece ``Encode`` into pieces, each piece's id by ``PieceToId``.

Upstream then splits the pieces into segments of at most ``max_text_tokens_per_segment``
(120) tokens at sentence ends and merges neighbours back while they fit; every text of at
most 120 tokens is one segment.  The reference synthesises one segment and refuses a
longer text by name.

IndexTTS-2.5 (a tiktoken BPE file; ``indextts/utils/tokenizer.py`` ``get_encoding`` and
``infer_v2_5._prepare_text`` with ``text_normalization=False``), every constant from the
manifest's ``pipeline.tokens.tokenizer`` (``spec`` below):

1. :func:`tiktoken_encoding`: the ranks of the file, then ``special_tokens`` and the
   ``timestamp_tokens`` with ids from ``len(ranks)`` on, split by ``pat_str``.
2. :func:`prepare_2_5`: ``char_map`` (punctuation and brackets mapped; twice, except for
   the ``char_map_single_pass`` languages), lower- or upper-casing by language,
   ``<word|pronunciation>`` annotations to the special tokens, ``<|x|>`` upper-cased.
   No number or symbol normalisation: give the text as it is to be spoken.  Japanese
   (``unsupported_languages``) needs upstream's morphological word split and is refused.
3. :func:`tiktoken_ids`: ``prefix`` (``<|lang|> ``) + the prepared text, encoded with
   every special token allowed.
"""

from __future__ import annotations

import base64
import os
import re

# The CJK ranges upstream's tokenize_by_CJK_char splits around (indextts/utils/common.py).
CJK = re.compile("([\u1100-\u11ff\u2e80-\ua4cf\ua840-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff65-\uffdc\U00020000-\U0002ffff])")
MAX_SEGMENT_TOKENS = 120


def pre_tokenize(text: str) -> str:
    """Step 2 above."""
    return " ".join(p.strip().upper() for p in CJK.split(text.strip()) if p.strip())


def sentencepiece_ids(model_path: str, text: str) -> list[int]:
    """Token ids of ``text`` with the SentencePiece model (IndexTTS-2)."""
    import sentencepiece

    if not text.strip():
        raise ValueError("the text is empty")
    sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    src = text if len(text.strip()) == 1 else pre_tokenize(text)
    pieces = sp.Encode(src, out_type=str)
    ids = [sp.PieceToId(p) for p in pieces]
    if len(ids) > MAX_SEGMENT_TOKENS:
        raise ValueError(f"the text has {len(ids)} tokens; upstream splits texts over {MAX_SEGMENT_TOKENS} tokens "
                         "into segments, which the reference does not: synthesise it in parts")
    return ids


# ------------------------------------------------------------------ IndexTTS-2.5

_ENCODINGS: dict = {}


def _specials(spec: dict) -> list[str]:
    ts = spec["timestamp_tokens"]
    return list(spec["special_tokens"]) + [ts["format"].format(i * ts["step"]) for i in range(ts["count"])]


def tiktoken_encoding(path: str, spec: dict):
    """``get_encoding`` of the bundled tiktoken file (cached per file and spec)."""
    import json

    import tiktoken

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, json.dumps(spec, sort_keys=True))
    if key in _ENCODINGS:
        return _ENCODINGS[key]
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}: line {n} is not 'base64-token rank'")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    specials = _specials(spec)
    first = len(ranks)
    enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=spec["pat_str"], mergeable_ranks=ranks,
                            special_tokens={t: first + i for i, t in enumerate(specials)},
                            explicit_n_vocab=first + len(specials))
    _ENCODINGS.clear()
    _ENCODINGS[key] = enc
    return enc


def prepare_2_5(text: str, lang: str, spec: dict) -> str:
    """``_prepare_text(text, lang, text_normalization=False)`` (step 2 above)."""
    lang = lang.lower()
    if lang in spec["unsupported_languages"]:
        raise ValueError(f"lang {lang!r}: {spec['unsupported_languages'][lang]}; the reference does not do this")
    table = spec["char_map"]
    pattern = re.compile("|".join(re.escape(k) for k in table))

    def sub(t: str) -> str:
        return pattern.sub(lambda m: table[m.group()], t)

    if lang not in spec["char_map_single_pass"]:
        text = sub(text)
    text = sub(text)
    if lang in spec["lower_case_languages"]:
        text = text.lower()
    elif lang in spec["upper_case_languages"]:
        text = text.upper()
    kana = [re.compile(k) for k in spec["annotation_kana"]]
    chinese = re.compile(spec["annotation_chinese"])

    def annotate(m: re.Match) -> str:
        word, said = m.group(1), m.group(2).upper()
        if any(k.fullmatch(said) for k in kana):
            return f" {said} "
        tok = spec["chinese_token"] if chinese.search(word) else spec["other_token"]
        return f"{tok}{said}{tok}"

    text = re.sub(spec["annotation_pattern"], annotate, text)
    return re.sub(spec["special_case_pattern"], lambda m: f"<|{m.group(1).upper()}|>", text)


def tiktoken_ids(path: str, spec: dict, text: str, lang: str, budget: int) -> list[int]:
    """Token ids of the prefixed, prepared ``text`` (IndexTTS-2.5); a prepared text of
    more than ``budget`` tokens (upstream's segment budget, the prefix excluded) is
    refused, as upstream would split it into segments."""
    if not text.strip():
        raise ValueError("the text is empty")
    enc = tiktoken_encoding(path, spec)
    lang = lang.lower()
    prepared = prepare_2_5(text, lang, spec)
    allowed = spec["allowed_special"]
    n = len(enc.encode(prepared, allowed_special=allowed))
    if n > budget:
        raise ValueError(f"the text has {n} tokens; upstream splits texts over {budget} tokens (the language prefix "
                         "aside) into segments, which the reference does not: synthesise it in parts")
    return enc.encode(spec["prefix"].format(lang=lang) + prepared, allowed_special=allowed)


def tiktoken_prefix_length(path: str, spec: dict, lang: str) -> int:
    """How many tokens the language prefix takes."""
    enc = tiktoken_encoding(path, spec)
    return len(enc.encode(spec["prefix"].format(lang=lang.lower()), allowed_special=spec["allowed_special"]))
