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

4. :func:`split_pieces`: the pieces split into segments as upstream's
   ``TextTokenizer.split_segments`` does (the rules and the budget, 120, from the
   manifest's ``inference.segment_split`` and ``max_text_tokens_per_segment``), each
   segment's ids by ``PieceToId``.  Every text of at most the budget is one segment.

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
3. :func:`split_text_2_5`: the prepared text split into segments of at most the budget
   (``infer_v2_5.split_text_by_tokens``; its patterns from ``inference.segment_split``).
4. :func:`tiktoken_segments`: per segment, ``prefix`` (``<|lang|> ``) + the segment's
   text, encoded with every special token allowed.
"""

from __future__ import annotations

import base64
import os
import re

# The CJK ranges upstream's tokenize_by_CJK_char splits around (indextts/utils/common.py).
CJK = re.compile("([\u1100-\u11ff\u2e80-\ua4cf\ua840-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff65-\uffdc\U00020000-\U0002ffff])")


def pre_tokenize(text: str) -> str:
    """Step 2 above."""
    return " ".join(p.strip().upper() for p in CJK.split(text.strip()) if p.strip())


def sentencepiece_pieces(model_path: str, text: str):
    """The SentencePiece pieces of ``text`` (IndexTTS-2, steps 2 and 3), and the model."""
    import sentencepiece

    if not text.strip():
        raise ValueError("the text is empty")
    sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    src = text if len(text.strip()) == 1 else pre_tokenize(text)
    return sp.Encode(src, out_type=str), sp


def sentencepiece_segments(model_path: str, text: str, budget: int, rules: dict) -> list[list[int]]:
    """The token ids of each segment of ``text`` (IndexTTS-2, steps 2 to 4)."""
    pieces, sp = sentencepiece_pieces(model_path, text)
    return [[sp.PieceToId(p) for p in seg] for seg in split_pieces(pieces, budget, rules)]


def split_pieces(pieces: list[str], budget: int, rules: dict, cut_at=None) -> list[list[str]]:
    """Upstream's ``split_segments_by_token`` (with ``quick_streaming_tokens`` 0, as
    ``infer`` calls it), rule for rule:

    - a segment ends after a ``cut_at`` piece (the sentence ends) once it holds more than
      two pieces; a following apostrophe piece is appended to it and, as upstream's
      ``i += 1`` inside a ``for`` loop has no effect, also begins the next segment;
    - as soon as the pieces gathered hold a comma piece (or, failing that, a dash), they
      are split again with the commas (the dash) as the ends, and what that gives is kept;
    - gathered pieces beyond ``budget`` are cut into runs of ``budget``;
    - then neighbouring segments are merged, left to right, while the two fit the budget.
    """
    if cut_at is None:
        cut_at = rules["sentence_end_pieces"]
    nested_rules = (rules["comma_pieces"], rules["dash_pieces"])
    found, gathered, counted = [], [], 0
    for i, piece in enumerate(pieces):
        gathered.append(piece)
        counted += 1
        again = next((ends for ends in nested_rules
                      if not any(e in cut_at for e in ends) and any(e in gathered for e in ends)), None)
        if again is not None:
            found.extend(split_pieces(gathered, budget, rules, again))
        elif counted <= budget:
            if piece in cut_at and counted > 2:
                if i + 1 < len(pieces) and pieces[i + 1] in rules["apostrophe_pieces"]:
                    gathered.append(pieces[i + 1])
                found.append(gathered)
                gathered, counted = [], 0
            continue
        else:
            found.extend(gathered[j:j + budget] for j in range(0, len(gathered), budget))
        gathered, counted = [], 0
    if counted:
        found.append(gathered)
    merged: list[list[str]] = []
    for seg in found:
        if merged and len(merged[-1]) + len(seg) <= budget:
            merged[-1] = merged[-1] + seg
        elif seg:
            merged.append(seg)
    return merged


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


def split_text_2_5(prepared: str, budget: int, token_len, rules: dict) -> list[str]:
    """``infer_v2_5.split_text_by_tokens``: a text of at most ``budget`` tokens is one
    segment.  Otherwise it is cut into chunks: each stretch matching
    ``protected_pattern`` (a pronunciation annotation) whole; the rest split after each
    punctuation mark (``split_after_pattern``), and a part that still does not fit cut
    between words (``word_pattern``), a word that does not fit by itself between
    characters, filling each chunk while it fits.  The chunks are then joined left to right
    while they fit.  ``token_len(text)``: its token count."""
    if token_len(prepared) <= budget:
        return [prepared]
    pieces, pos = [], 0
    for m in re.finditer(rules["protected_pattern"], prepared):
        if m.start() > pos:
            pieces.append((prepared[pos:m.start()], False))
        pieces.append((m.group(0), True))
        pos = m.end()
    if pos < len(prepared):
        pieces.append((prepared[pos:], False))
    chunks: list[str] = []
    for piece, whole in pieces:
        if whole:
            chunks.append(piece)
            continue
        for part in re.split(rules["split_after_pattern"], piece):
            if not part:
                continue
            if token_len(part) <= budget:
                chunks.append(part)
                continue
            units = [u for word in re.findall(rules["word_pattern"], part)
                     for u in ([word] if token_len(word) <= budget else list(word))]
            chunks += _pack(units, budget, token_len)
    return _pack(chunks, budget, token_len) or [prepared]


def _pack(units: list[str], budget: int, token_len) -> list[str]:
    """``units`` joined left to right into strings, each closed before the next unit would
    take it over ``budget`` tokens (a unit over the budget by itself stands alone)."""
    out, current = [], ""
    for unit in units:
        if current and token_len(current + unit) > budget:
            out.append(current)
            current = unit
        else:
            current += unit
    return out + [current] if current else out


def tiktoken_segments(path: str, spec: dict, text: str, lang: str, budget: int, rules: dict) -> list[list[int]]:
    """The token ids of each segment of the prepared ``text`` (IndexTTS-2.5, steps 1 to
    4); ``budget`` is upstream's segment budget, the prefix excluded."""
    if not text.strip():
        raise ValueError("the text is empty")
    enc = tiktoken_encoding(path, spec)
    lang = lang.lower()
    prepared = prepare_2_5(text, lang, spec)
    allowed = spec["allowed_special"]
    prefix = spec["prefix"].format(lang=lang)
    segments = split_text_2_5(prepared, budget, lambda t: len(enc.encode(t, allowed_special=allowed)), rules)
    return [enc.encode(prefix + seg, allowed_special=allowed) for seg in segments]


def tiktoken_prefix_length(path: str, spec: dict, lang: str) -> int:
    """How many tokens the language prefix takes."""
    enc = tiktoken_encoding(path, spec)
    return len(enc.encode(spec["prefix"].format(lang=lang.lower()), allowed_special=spec["allowed_special"]))
