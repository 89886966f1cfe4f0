#!/usr/bin/env python3
"""Generate the committed IndexTTS-2.5 demo release from the real upstream classes at tiny sizes.

    python scripts/make_demo_2_5.py demo/release-2.5      (or: make demo)

The folder has the layout of an IndexTTS-2.5 release after upstream's first run:
config.yaml, gpt.pth (456-tensor layout: spk_emb_proj, lang_embedding, text_head),
s2mel.pth ({"net": ...}, parameters only), codec.pth ({"model": ...} with the training
optimizer state beside it), wav2vec2bert_stats.pt, feat1.pt, feat2.pt,
multilingual_zh_ja_yue_char_del.tiktoken, qwen0.6bemo4-merge/, and hf_cache/ with
w2v-bert-2.0/, campplus_cn_common.bin (and campplus.json, this tool's note of the demo's
CAMPPlus sizes), bigvgan/ and the MaskGCT codec file 2.5 never uses.

config.yaml is as hostile as the first published one: it says ``version: 2.0`` and names
the gpt and s2mel checkpoints by absolute paths on the authors' cluster; the tiktoken
tokenizer is named by no key (``dataset.bpe_model: bpe.model``, which 2.5 never reads).
Weights are random; the sizes agree across files as a release's do (CAMPPlus's
embedding is 192 wide, the width 2.5's GPT hard-codes for spk_emb_proj, so the s2mel
style and the speaker matrix are 192 wide too), so the bundle passes ``check``.
"""

import copy
import os
import sys

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# gpt_checkpoint and s2mel_checkpoint: verbatim from IndexTeam/IndexTTS-2.5 config.yaml @ d0aa86e
GPT_CHECKPOINT = "/cubefs/users/liyunpei/fsdp/model_dir/6140984_xjc_emo_with_fixed_emo/checkpoint_5000.pth"
S2MEL_CHECKPOINT = "/cubefs/users/vanka0051/gitlab/startts/startts-fsdp/startts/egs2/multi_lang/exp/exp_tmp/DiT_gptlatent_10000.pth"
STYLE = 192  # infer_v2_5: CAMPPlus(feat_dim=80, embedding_size=192); UnifiedVoice: spk_emb_proj = Linear(192, model_dim)


def main(release_dir: str) -> None:
    from safetensors.torch import save_model

    from tests.upstream import (bigvgan, campplus, emotion_matrix, gpt25, qwen_emotion, s2mel, semantic_codec,
                                semantic_codec25, speaker_matrix, tokenizer, w2v_bert)

    os.makedirs(release_dir, exist_ok=True)
    cache = os.path.join(release_dir, "hf_cache")
    s2 = s2mel.demo_config()["s2mel"]
    s2["style_encoder"]["dim"] = STYLE
    config = {
        "dataset": {"bpe_model": "bpe.model"},  # as the released 2.5 config; the 2.5 code never reads it
        **gpt25.demo_config(),
        **semantic_codec25.demo_config(),
        "s2mel": s2,
        "gpt_checkpoint": GPT_CHECKPOINT,
        "w2v_stat": "wav2vec2bert_stats.pt",
        "s2mel_checkpoint": S2MEL_CHECKPOINT,
        **speaker_matrix.demo_config(),
        **qwen_emotion.demo_config(),
        "vocoder": {"type": "bigvgan", "name": "bigvgan_generator.pt"},
        "version": 2.0,
    }
    with open(os.path.join(release_dir, "config.yaml"), "w") as f:
        f.write("# Tiny IndexTTS-2.5 demo release: random weights, the real layout. Made by scripts/make_demo_2_5.py.\n")
        yaml.safe_dump(config, f, sort_keys=False)

    gpt25.write_demo(release_dir, config)
    m = s2mel.build(config["s2mel"], seed=0)  # s2mel.pth: {"net": {cfm, length_regulator, gpt_layer}}, parameters only
    nets = {k: {n: t.to(torch.float16) if t.is_floating_point() else t for n, t in sd.items()}
            for k, sd in s2mel.net(m).items()}
    torch.save({"net": nets}, os.path.join(release_dir, "s2mel.pth"))
    semantic_codec25.write_demo(release_dir, config)
    speaker_matrix.write_demo(release_dir, config)
    emotion_matrix.write_demo(release_dir, config)
    tokenizer.write_tiktoken(release_dir)
    qwen_emotion.write_demo(release_dir, config)

    wm = w2v_bert.build(w2v_bert.DEMO, seed=0)
    w2v_bert.save_plain(wm, os.path.join(cache, "w2v-bert-2.0"))
    w2v_bert.save_preprocessor(os.path.join(cache, "w2v-bert-2.0"))
    w2v_bert.write_stats(os.path.join(release_dir, "wav2vec2bert_stats.pt"), w2v_bert.stats(w2v_bert.DEMO["hidden_size"]))
    cam = {**campplus.TINY, "embedding_size": STYLE}
    campplus.save_release(campplus.build(cam, seed=2026), cache, cam, dtype=torch.float16)
    bigvgan.save_release(bigvgan.build(bigvgan.DEMO, seed=2026), os.path.join(cache, "bigvgan"), bigvgan.DEMO)
    save_model(semantic_codec.build(semantic_codec.DEMO, seed=2026), os.path.join(cache, "semantic_codec_model.safetensors"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(release_dir) for f in fs)
    print(f"wrote {release_dir} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "demo", "release-2.5"))
