"""A tiny Qwen-shaped emotion classifier folder for the demo release, in the layout of
IndexTTS-2's ``qwen0.6bemo4-merge/`` (a transformers Qwen3 causal LM saved as
safetensors, with its tokenizer), generated from transformers' own classes."""

from __future__ import annotations

import os

FOLDER = "qwen0.6bemo4-merge"
WORDS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "happy", "angry", "sad", "afraid", "disgusted",
         "melancholic", "surprised", "calm", "text", ":", "0", "1", "."]


def demo_config() -> dict:
    return {"qwen_emo_path": FOLDER + "/"}


def write_demo(release_dir: str, config: dict) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    folder = os.path.join(release_dir, config["qwen_emo_path"].rstrip("/"))
    torch.manual_seed(2026)
    cfg = Qwen3Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=True, torch_dtype="float16")
    Qwen3ForCausalLM(cfg).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(folder)
