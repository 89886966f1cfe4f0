"""IndexTTS-2.5 GPT (``indextts/gpt/model_v2_5.py``; at upstream's HEAD, infer_v2_5 builds
``model_v2.UnifiedVoice(**cfg.gpt, spk_cond_mode="campplus")``, the same layout) ->
``gpt.safetensors`` (schema section ``gpt@2.5``).

Source: IndexTTS-2.5's ``gpt.pth``, a flat state dict (456 tensors at the released
config), or ``{"model": ...}``, or a naive safetensors dump.  Hyperparameters: the
``gpt:`` section of the release's ``config.yaml`` (its ``condition_type`` and
``condition_module`` are ignored: 2.5 has no speaker Conformer or Perceiver).

Compared with 2.0 (:mod:`converters.models.gpt`), whose rows it shares:
- the speaker is the CAMPPlus style vector: ``spk_emb_proj`` (Linear 192 -> model_dim,
  192 hard-coded upstream) gives one latent; the two rows after it are zeros (2.0's
  speed embeddings are gone)
- ``lang_embedding`` (``len(LANGUAGE_DICT) + 1`` rows; 106 languages in
  ``indextts/utils/tokenizer.py``) is added to every text embedding
- the emotion Conformer, its Perceiver, ``emovec_layer`` and ``emo_layer``, the GPT-2
  stack (``Conv1D`` transposed, ``c_attn`` split into q/k/v), GLU and GEGLU halves and
  the Perceiver ``to_kv`` split are converted exactly as in 2.0
- the emotion Conformer's ``pe`` buffer is kept as stored: the released file holds the
  sinusoid rounded through bfloat16, and upstream runs with the stored values; it is
  rebuilt from the config only when a source lacks it (upstream then keeps its own)
- dropped: ``text_head`` (inference never calls it)
"""

from __future__ import annotations

from . import gpt as v2
from ..io.configs import require
from ..format.table import WB, Drop, keep, row

load_config = v2.load_config
sinusoid_table = v2.sinusoid_table
SECTION = v2.SECTION
RELEASE_VALUES = {"number_text_tokens": 60509}  # IndexTTS-2.0's says 12000
CONFIG_DIMS = v2.SHARED_DIMS  # no speaker Conformer: condition_module sizes nothing

SPEAKER_EMBEDDING_DIM = 192  # UnifiedVoice: self.spk_emb_proj = nn.Linear(192, model_dim)
CONDITION_ZERO_ROWS = 2  # conds = cat(spk + emovec, zeros(B, 2, model_dim)) in forward and inference_speech
# indextts/utils/tokenizer.py LANGUAGES, in order: lang_to_token(lang) = LANGUAGE_DICT[lang] is the
# lang_embedding row; the table has len(LANGUAGE_DICT) + 1 rows.
LANGUAGES = (
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it", "id", "hi", "fi",
    "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur", "hr", "bg", "lt", "la", "mi", "ml",
    "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn", "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs",
    "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am",
    "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln",
    "ha", "ba", "jw", "su", "yue", "minnan", "wuyu", "dialect", "zh/en", "en/zh", "common",
)

DROPS: list[Drop] = [
    *v2.DROPS,
    Drop(r"text_head\.(weight|bias)",
         "text prediction head: only the training loss reads it; IndexTTS-2.5 inference (inference_speech) runs "
         "mel_head alone, and the upstream package indextts25-inference does not even build it"),
]


def runtime_config(raw: dict, path: str) -> dict:
    require(raw, v2.CORE_INTS + ("emo_condition_module",), path, "gpt")
    cfg = v2.core_config(raw, path, "IndexTTS-2.5")
    cfg.update({
        "speaker_conditioning": "campplus",  # spk_emb_proj(CAMPPlus style), one latent
        "speaker_embedding_dim": SPEAKER_EMBEDDING_DIM,
        "condition_zero_rows": CONDITION_ZERO_ROWS,
        "languages": list(LANGUAGES),
        "language_vocab_size": len(LANGUAGES) + 1,
        **v2.emotion_stacks(raw, path),
    })
    return cfg


def table(cfg: dict):
    rows = [
        *v2.embedding_rows(),
        *keep("spk_emb_proj", params=WB),
        row("lang_embedding.weight", "copy", "lang_embedding.weight"),
        *v2.gpt2_rows(),
        *v2._conformer_rows("emo_conditioning_encoder", "eb"),
        *v2._perceiver_rows("emo_perceiver_encoder", "el", cfg["emo_perceiver_encoder"]["has_proj_context"]),
    ]
    loops = {
        "i": cfg["layers"],
        "eb": cfg["emo_conditioning_encoder"]["num_blocks"],
        "el": cfg["emo_perceiver_encoder"]["depth"],
    }
    return rows, loops
