"""What exists, as plain data (no torch import, so the CLI and ``check`` start fast).

- ``MODELS``: model kind -> the module under ``converters/`` that converts it
- ``EXTRA_FILES``: per model, extra source files a command takes as options
  (``--stats`` for w2v-bert): option -> (help, file name inside a release folder)
- ``CHOICES``: per model, options that change the canonical form: option ->
  (allowed values, default, help); passed to the module's ``runtime_config``
- ``SOURCE_FILES``, ``CONFIG_FILES`` and :func:`locate`: where a model's checkpoint
  and config are found (torch-free, so the CLI can start hashing the source before
  it imports torch)
"""

from __future__ import annotations

import os

from .errors import ConvertError

CONVERTER_VERSION = "0.1.0"

MODELS: dict[str, str] = {
    "gpt": "converters.gpt",
    "s2mel": "converters.s2mel",
    "w2v-bert": "converters.w2v_bert",
    "bigvgan": "converters.bigvgan",
    "speaker-matrix": "converters.speaker_matrix",
    "emotion-matrix": "converters.emotion_matrix",
    "semantic-codec": "converters.semantic_codec",
    "campplus": "converters.campplus",
}

DTYPE_NAMES = ("keep", "float32", "float16", "bfloat16")

EXTRA_FILES: dict[str, dict[str, tuple[str, str]]] = {
    "w2v-bert": {
        "stats": ("IndexTTS-2's wav2vec2bert_stats.pt (default: looked for beside the model and in its parent folder).",
                  "wav2vec2bert_stats.pt"),
    },
}

CHOICES: dict[str, dict[str, tuple[tuple[str, ...], str, str]]] = {
    "w2v-bert": {
        "profile": (("full", "indextts2"), "full",
                    "full: every layer plus the feature statistics. indextts2: only the layers IndexTTS-2 runs, "
                    "with the statistics folded into the last one's layer norm."),
    },
}


# Where a per-model SRC folder holds the checkpoint (first match wins), and the config
# file read beside it: (file name, optional).  An optional config that is absent means
# the module's upstream defaults (CAMPPlus: infer_v2 hard-codes its constructor args).
SOURCE_FILES: dict[str, tuple[str, ...]] = {
    "gpt": ("gpt.pth", "gpt.safetensors"),
    "s2mel": ("s2mel.pth", "s2mel.safetensors"),
    "w2v-bert": ("model.safetensors",),
    "bigvgan": ("bigvgan_generator.pt", "bigvgan_generator.safetensors", "model.safetensors", "bigvgan.safetensors"),
    "speaker-matrix": ("feat1.pt",),
    "emotion-matrix": ("feat2.pt",),
    "semantic-codec": ("model.safetensors", "semantic_codec.safetensors"),
    "campplus": ("campplus_cn_common.bin",),
}
CONFIG_FILES: dict[str, tuple[str, bool]] = {
    "gpt": ("config.yaml", False),
    "s2mel": ("config.yaml", False),
    "w2v-bert": ("config.json", False),
    "bigvgan": ("config.json", False),
    "speaker-matrix": ("config.yaml", False),
    "emotion-matrix": ("config.yaml", False),
    "semantic-codec": ("config.yaml", False),
    "campplus": ("campplus.json", True),
}


def locate(kind: str, src: str, config: str | None, need_config: bool = True) -> tuple[str, str | None]:
    """The source file and config for a per-model SRC that may be a file or a folder."""
    if os.path.isdir(src):
        for name in SOURCE_FILES[kind]:
            p = os.path.join(src, name)
            if os.path.isfile(p):
                src_file = p
                break
        else:
            raise ConvertError(f"{src}: no {kind} checkpoint in this folder (looked for {', '.join(SOURCE_FILES[kind])})")
    elif os.path.exists(src):
        src_file = src
    else:
        raise ConvertError(f"{src}: no such file or folder")
    name, optional = CONFIG_FILES[kind]
    cfg = config or os.path.join(os.path.dirname(os.path.abspath(src_file)), name)
    if not config and optional and not os.path.isfile(cfg):
        return src_file, None  # no config file: the module's load_config(None) gives upstream's fixed values
    if need_config and not os.path.isfile(cfg):
        raise ConvertError(f"{cfg}: config not found (the {kind} converter reads {name} beside the source; pass --config)")
    return src_file, cfg
