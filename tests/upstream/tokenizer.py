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
