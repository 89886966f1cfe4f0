"""The text segmentation of reference/text.py against upstream's own functions, on
random inputs (hypothesis): IndexTTS-2.0's ``TextTokenizer.split_segments_by_token``
(indextts2-inference ``indextts/utils/front.py``) and IndexTTS-2.5's
``IndexTTS2.split_text_by_tokens`` (indextts25-inference ``infer_v2_5.py``), with the
rules the manifest carries (``pipeline.inference.segment_split``).  The end-to-end tests
(tests/test_e2e_upstream.py) then synthesise a text of two segments in both releases."""

from __future__ import annotations

import re
import types
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.release.pipeline import INFERENCE, INFERENCE_2_5
from reference import text

pytestmark = pytest.mark.fuzz

# Every piece the 2.0 rules name, and ordinary ones.
PIECES_2_0 = [".", "!", "?", "\u2581.", "\u2581?", "\u2581...", ",", "\u2581,", "-", "'", "\u2581'",
              "A", "\u2581B", "CD", "\u2581E", "\u2581"]
# Punctuation of both scripts, spaces, line breaks, annotations, a long word, CJK.
WORDS_2_5 = ["ab", "hello", "x", "\uff0c", "\u3002", ",", ".", "!", "?", ";", ":", "\n", " ", "  ", "\u4f60\u597d\u4e16\u754c",
             "<|SPECIAL_TOKEN_1|>", "<|SPECIAL_TOKEN_2|>", "abcdefghijkl", "\u3001", "\uff1b", "\uff01", "<|en|>"]


def _front():
    from converters.cli.forward import indextts

    return indextts("utils.front").TextTokenizer


def test_rules_are_upstreams():
    """The manifest's rule pieces and patterns are the ones upstream's code holds."""
    tok = _front()
    assert INFERENCE["segment_split"]["sentence_end_pieces"] == tok.punctuation_marks_tokens
    from tests.upstream import e2e

    cls = e2e.infer_v2_5().IndexTTS2
    assert INFERENCE_2_5["segment_split"]["protected_pattern"] == cls.SPLIT_PROTECTED_PATTERN.pattern
    assert INFERENCE_2_5["max_text_tokens_per_segment"] == INFERENCE["max_text_tokens_per_segment"] == 120


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES_2_0), max_size=40), st.integers(1, 12))
def test_2_0_segments_are_upstreams(pieces, budget):
    tok = _front()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream warns when it cuts a run of pieces by length
        want = tok.split_segments_by_token(list(pieces), tok.punctuation_marks_tokens, budget)
    assert text.split_pieces(pieces, budget, INFERENCE["segment_split"]) == want


def _tokens(t: str) -> list[str]:
    """A stand-in tokenizer for the split: special tokens whole, up to 3 word characters, else one character."""
    return re.findall(r"<\|[^|]+\|>|\w{1,3}|\S", t)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WORDS_2_5), st.sampled_from(["", " "])), max_size=30),
       st.integers(3, 30), st.integers(2, 40))
def test_2_5_segments_are_upstreams(words, capacity, max_tokens):
    from tests.upstream import e2e

    cls = e2e.infer_v2_5().IndexTTS2
    s = "".join(w + sep for w, sep in words)
    up = types.SimpleNamespace(tokenizer=types.SimpleNamespace(encode=lambda t, allowed_special=None: _tokens(t)),
                               SPLIT_PROTECTED_PATTERN=cls.SPLIT_PROTECTED_PATTERN,
                               gpt=types.SimpleNamespace(text_pos_embedding=types.SimpleNamespace(
                                   emb=types.SimpleNamespace(num_embeddings=capacity + 2))))
    up._token_len = lambda t: cls._token_len(up, t)
    up._split_atomic_pieces = lambda t: cls._split_atomic_pieces(up, t)
    prefix = "<|en|> "
    want = cls.split_text_by_tokens(up, s, max_tokens, prefix)
    budget = max(1, min(max_tokens, capacity) - len(_tokens(prefix)))  # as pipeline_2_5._segments computes it
    assert text.split_text_2_5(s, budget, lambda t: len(_tokens(t)), INFERENCE_2_5["segment_split"]) == want
