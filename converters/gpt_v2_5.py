"""IndexTTS-2.5 GPT (``indextts/gpt/model_v2_5.py``; at upstream's HEAD, infer_v2_5 builds
``model_v2.UnifiedVoice(**cfg.gpt, spk_cond_mode="campplus")``, the same layout) ->
``gpt.safetensors`` (schema section ``gpt@2.5``).

Source: IndexTTS-2.5's ``gpt.pth``, a flat state dict (456 tensors at the released
config), or ``{"model": ...}``, or a naive safetensors dump.  Hyperparameters: the
``gpt:`` section of the release's ``config.yaml`` (its ``condition_type`` and
``condition_module`` are ignored: 2.5 has no speaker Conformer or Perceiver).

Compared with 2.0 (:mod:`converters.gpt`), whose rows it shares:
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
from .configs import require
from .errors import ConvertError
from .table import WB, Drop, keep, row

load_config = v2.load_config
sinusoid_table = v2.sinusoid_table

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
    need = ("model_dim", "layers", "heads", "max_text_tokens", "max_mel_tokens", "number_text_tokens",
            "number_mel_codes", "start_text_token", "stop_text_token", "start_mel_token", "stop_mel_token",
            "emo_condition_module")
    require(raw, need, path, "gpt")
    if not raw.get("use_mel_codes_as_input", True):
        raise ConvertError(f"{path}: gpt.use_mel_codes_as_input false (a MelEncoder front end) is not supported")
    if raw.get("train_solo_embeddings", False):
        raise ConvertError(f"{path}: gpt.train_solo_embeddings true is not supported (IndexTTS-2.5 uses false)")
    d, heads = int(raw["model_dim"]), int(raw["heads"])
    if d % heads:
        raise ConvertError(f"{path}: gpt.model_dim {d} is not divisible by heads {heads}")
    types = int(raw.get("types", 1))
    max_cond = int(raw.get("max_conditioning_inputs", 1))
    cfg = {k: int(raw[k]) for k in ("model_dim", "layers", "heads", "max_text_tokens", "max_mel_tokens",
                                     "number_text_tokens", "number_mel_codes", "start_text_token",
                                     "stop_text_token", "start_mel_token", "stop_mel_token")}
    emo = v2._conformer(raw, "emo_condition_module", path)
    cfg.update({
        "use_mel_codes_as_input": True,
        "train_solo_embeddings": False,
        "types": types,
        "max_conditioning_inputs": max_cond,
        "mel_length_compression": int(raw.get("mel_length_compression", 1024)),
        "head_dim": d // heads,
        "text_vocab_size": int(raw["number_text_tokens"]) * types + 1,
        "mel_positions": int(raw["max_mel_tokens"]) + 2 + max_cond,
        "text_positions": int(raw["max_text_tokens"]) + 2,
        "gpt_n_inner": 4 * d,
        "gpt_activation": "gelu_new",
        "gpt_layer_norm_epsilon": v2.LN_EPS,
        "gpt_position_embeddings": "none",
        "final_norm_eps": v2.LN_EPS,
        "emovec_in": v2.EMOVEC_IN,
        "speaker_conditioning": "campplus",  # spk_emb_proj(CAMPPlus style), one latent
        "speaker_embedding_dim": SPEAKER_EMBEDDING_DIM,
        "condition_zero_rows": CONDITION_ZERO_ROWS,
        "languages": list(LANGUAGES),
        "language_vocab_size": len(LANGUAGES) + 1,
        "emo_condition_module": dict(raw["emo_condition_module"]),
        "emo_conditioning_encoder": emo,
        "emo_perceiver_encoder": v2._perceiver(v2.EMO_PERCEIVER_DIM, emo["output_size"],
                                               raw["emo_condition_module"]["perceiver_mult"], emo["attention_heads"], 1),
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
