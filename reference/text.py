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
"""

from __future__ import annotations

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
