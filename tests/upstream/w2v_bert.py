"""Tiny transformers ``Wav2Vec2BertModel`` (the class IndexTTS-2 loads for
``facebook/w2v-bert-2.0``) and IndexTTS-2's ``wav2vec2bert_stats.pt``.

The tiny models keep w2v-bert-2.0's structure (relative_key attention, swish, causal
depthwise conv, SpecAugment vector present because mask_time_prob > 0) at small widths.
They have at least 17 layers, because IndexTTS-2 reads ``hidden_states[17]`` and the
converter refuses encoders that do not have it.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import torch

# Small widths; everything else as in w2v-bert-2.0's config.json except the relative
# window and kernel, shrunk so that short test inputs reach the clamp on both sides.
TINY = {
    "hidden_size": 16,
    "num_hidden_layers": 18,
    "num_attention_heads": 2,
    "intermediate_size": 24,
    "feature_projection_input_dim": 12,
    "left_max_position_embeddings": 5,
    "right_max_position_embeddings": 3,
    "conv_depthwise_kernel_size": 5,
    "position_embeddings_type": "relative_key",
    "hidden_act": "swish",
    "layer_norm_eps": 1e-5,
    "mask_time_prob": 0.05,
    "add_adapter": False,
}

# The demo release: w2v-bert-2.0's real window, kernel, layer count and input width
# (80 fbank bins x stride 2), at hidden size 16 (about 0.5 MB in float32).
DEMO = {
    **TINY,
    "num_hidden_layers": 24,
    "intermediate_size": 32,
    "feature_projection_input_dim": 160,
    "left_max_position_embeddings": 64,
    "right_max_position_embeddings": 8,
    "conv_depthwise_kernel_size": 31,
}


def hf_config(config: dict | None = None):
    from transformers import Wav2Vec2BertConfig

    return Wav2Vec2BertConfig(**dict(config or TINY))


def build(config: dict | None = None, seed: int = 0):
    """A Wav2Vec2BertModel with random weights everywhere: LayerNorm scales far from 1,
    non-zero biases and shifts, distinct SpecAugment vector."""
    from transformers import Wav2Vec2BertModel

    torch.manual_seed(seed)
    m = Wav2Vec2BertModel(hf_config(config))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("distance_embedding.weight"):
                p.copy_(torch.randn_like(p))
            else:  # Linear / Conv1d weights [out, in/groups, k...]
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    return m.eval()


def features(config: dict | None = None, seed: int = 1, lengths=(11, 7)):
    """A padded batch of input features and its attention mask (as the feature
    extractor returns them: padded frames are zero, mask 0 there)."""
    cfg = dict(config or TINY)
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    x = torch.randn(len(lengths), t, cfg["feature_projection_input_dim"], generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        x[b, n:] = 0
    return x, mask


def hidden_states(m, x, mask):
    with torch.no_grad():
        return m(input_features=x, attention_mask=mask, output_hidden_states=True).hidden_states


def save_plain(m, folder: str) -> str:
    """save_pretrained (safetensors): folder/model.safetensors + folder/config.json."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    m.save_pretrained(folder, safe_serialization=True)
    return folder


def save_preprocessor(folder: str) -> str:
    """preprocessor_config.json as facebook/w2v-bert-2.0 has it: the feature extractor
    IndexTTS-2 loads (SeamlessM4TFeatureExtractor; the repo sets padding_value 1)."""
    from transformers import SeamlessM4TFeatureExtractor

    SeamlessM4TFeatureExtractor(padding_value=1.0).save_pretrained(folder)
    return os.path.join(folder, "preprocessor_config.json")


def save_snapshot(m, hub: str, rev: str = "da985ba0987f70aaeb84a80f2851cfac8c697a7b") -> str:
    """Lay the model out as the Hugging Face cache does:
    hub/models--facebook--w2v-bert-2.0/{blobs/<sha256>, snapshots/<rev>/<file> -> ../../blobs/<sha256>}.
    Returns the snapshot folder."""
    repo = os.path.join(hub, "models--facebook--w2v-bert-2.0")
    tmp = os.path.join(repo, "tmp_save")
    save_plain(m, tmp)
    blobs, snap = os.path.join(repo, "blobs"), os.path.join(repo, "snapshots", rev)
    os.makedirs(blobs, exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(tmp, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shutil.move(os.path.join(tmp, name), os.path.join(blobs, digest))
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snap, name))
    shutil.rmtree(tmp)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(rev)
    return snap


def stats(hidden: int, seed: int = 7) -> dict[str, torch.Tensor]:
    """Statistics shaped like IndexTTS-2's wav2vec2bert_stats.pt: {"mean", "var"}."""
    g = torch.Generator().manual_seed(seed)
    return {"mean": torch.randn(hidden, generator=g), "var": torch.rand(hidden, generator=g) * 3 + 0.05}


def write_stats(path: str, st: dict[str, torch.Tensor]) -> str:
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(st, path)
    else:
        torch.save(st, path)
    return path


def demo_config() -> dict:
    return {}  # w2v-bert reads its own config.json, not IndexTTS-2's config.yaml


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/w2v-bert-2.0/{model.safetensors, config.json} and
    release_dir/wav2vec2bert_stats.pt, from a tiny 24-layer model (hidden size 16, so
    the statistics have 16 entries; IndexTTS-2's gpt expects 1024-wide features, so the
    demo's features do not fit a real-size gpt)."""
    m = build(DEMO, seed=0)
    save_plain(m, os.path.join(release_dir, "w2v-bert-2.0"))
    save_preprocessor(os.path.join(release_dir, "w2v-bert-2.0"))
    write_stats(os.path.join(release_dir, "wav2vec2bert_stats.pt"), stats(DEMO["hidden_size"]))
