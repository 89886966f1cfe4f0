"""What exists, as plain data (no torch import, so the CLI and ``check`` start fast).

- ``MODELS``: model kind -> the module under ``converters/`` that converts it
- ``EXTRA_FILES``: per model, extra source files a command takes as options
  (``--stats`` for w2v-bert): option -> (help, file name inside a release folder)
- ``CHOICES``: per model, options that change the canonical form: option ->
  (allowed values, default, help); passed to the module's ``runtime_config``
"""

from __future__ import annotations

import hashlib

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


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)
