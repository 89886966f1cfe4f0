"""A tiny text tokenizer for the demo release: a SentencePiece BPE model, the kind
IndexTTS-2 ships as ``bpe.model`` (12,000 pieces there; here as many pieces as the demo
GPT has text tokens), trained on a few generated sentences."""

from __future__ import annotations

import io
import os

WORDS = ["ab", "ba", "cab", "bad", "dab", "ace", "bead", "cede", "dace", "face"]


def demo_config() -> dict:
    return {"dataset": {"bpe_model": "bpe.model"}}


def write_demo(release_dir: str, config: dict) -> None:
    import sentencepiece as spm

    vocab = config["gpt"]["number_text_tokens"]
    sentences = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6)) for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab,
                                   model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2,
                                   normalization_rule_name="identity")  # no 240 KB NFKC table in a demo
    with open(os.path.join(release_dir, config["dataset"]["bpe_model"]), "wb") as f:
        f.write(model.getvalue())


# ------------------------------------------------------------------ IndexTTS-2.5

TIKTOKEN = "multilingual_zh_ja_yue_char_del.tiktoken"  # upstream get_tokenizer(multilingual=True)


def write_tiktoken(release_dir: str) -> str:
    """release_dir/multilingual_zh_ja_yue_char_del.tiktoken: tiktoken BPE ranks, one
    ``base64(token) rank`` per line (the format upstream's ``get_encoding`` reads): the 256
    single bytes, then a few merges of the demo words."""
    import base64

    tokens = [bytes([b]) for b in range(256)]
    for w in WORDS:
        for piece in (w, " " + w):
            for i in range(2, len(piece) + 1):
                t = piece[:i].encode()
                if t not in tokens:
                    tokens.append(t)
    path = os.path.join(release_dir, TIKTOKEN)
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens))
    return path
