#!/usr/bin/env python3
"""Generate the committed demo release from the real upstream classes at tiny sizes.

    python scripts/make_demo.py demo/release      (or: make demo)

The folder gets the layout of an IndexTTS-2 release (config.yaml, gpt.pth, s2mel.pth,
wav2vec2bert_stats.pt, feat1.pt, feat2.pt, bpe.model, qwen0.6bemo4-merge/) plus the
Hugging Face models that `convert.py all` also looks for inside it: w2v-bert-2.0/,
bigvgan/ (config.yaml names it as the vocoder), MaskGCT/semantic_codec/, campplus/.
Weights are random; the sizes are tiny but agree with each other across files as a
release's do (check's cross-file rules), so the bundle converts and checks end to end
in seconds on a fresh clone.
"""

import importlib
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUILDERS = ("gpt", "s2mel", "w2v_bert", "bigvgan", "speaker_matrix", "emotion_matrix", "semantic_codec", "campplus",
            "tokenizer", "qwen_emotion")  # tests/upstream/<name>.py


def main(release_dir: str) -> None:
    os.makedirs(release_dir, exist_ok=True)
    mods = [importlib.import_module(f"tests.upstream.{name}") for name in BUILDERS]
    config: dict = {}
    for m in mods:
        config.update(m.demo_config())
    config.update({"gpt_checkpoint": "gpt.pth", "s2mel_checkpoint": "s2mel.pth", "w2v_stat": "wav2vec2bert_stats.pt",
                   "version": 2.0})
    with open(os.path.join(release_dir, "config.yaml"), "w") as f:
        f.write("# Tiny demo release: random weights, the real IndexTTS-2 layout. Made by scripts/make_demo.py.\n")
        yaml.safe_dump(config, f, sort_keys=False)
    for m in mods:
        m.write_demo(release_dir, config)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(release_dir) for f in fs)
    print(f"wrote {release_dir} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "demo", "release"))
