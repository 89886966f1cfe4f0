"""Which IndexTTS release a checkpoint belongs to: 2.0 or 2.5 (1.x is refused).

Standard library only (``check`` and ``inspect`` use it without torch).  The release's
own ``config.yaml`` is no evidence: IndexTTS-2.5's first published config says
``version: 2.0``.  What decides:

- **the tensors**, for the two models whose layout changed:
  - gpt: 2.5's ``UnifiedVoice(spk_cond_mode="campplus")`` has ``spk_emb_proj`` and
    ``lang_embedding`` and no ``conditioning_encoder``/``perceiver_encoder``/``speed_emb``;
    2.0's has both Conformer encoders; 1.x's (``indextts/gpt/model.py``) a speaker
    ``conditioning_encoder`` and no emotion encoder.
  - semantic codec: 2.5's ``EnhancedCodec`` (``codec.pth``) has the ``down``/``up``
    resampling convs; 2.0's MaskGCT ``RepCodec`` has none.
- **the files of the release folder** around a source, for the models whose layout is
  the same in both (s2mel, the matrices, w2v-bert, BigVGAN, CAMPPlus): ``codec.pth`` or
  the 2.5 tokenizer ``multilingual_zh_ja_yue_char_del.tiktoken`` make it 2.5; 1.x's
  ``dvae.pth`` or ``bigvgan_generator.pth`` make it unsupported; anything else is 2.0,
  as every file made before 2.5 existed.

Canonical files record ``family: indextts`` and ``family_version`` in their metadata.
"""

from __future__ import annotations

import os

from ..errors import ConvertError

FAMILY = "indextts"
VERSIONS = ("2.0", "2.5")
DEFAULT = "2.0"  # what a file says when nothing shows it is 2.5 (every file before 2.5 existed)
TOKENIZER_2_5 = "multilingual_zh_ja_yue_char_del.tiktoken"  # indextts/utils/tokenizer.py get_tokenizer(multilingual=True)
CODEC_2_5 = "codec.pth"  # infer_v2_5: os.path.join(model_dir, "codec.pth")
MARKERS_2_5 = (CODEC_2_5, TOKENIZER_2_5)
MARKERS_1_X = ("dvae.pth", "bigvgan_generator.pth")  # IndexTTS 1.0/1.5 release files
# Models whose canonical layout differs between versions (schema sections "<kind>@<version>").
VERSIONED_KINDS = ("gpt", "semantic-codec")
# The modules whose tensors tell the release: 2.5's GPT has the first, 2.0's the second;
# 2.5's codec has the resampling convs, 2.0's none.
GPT_2_5_MODULES = ("spk_emb_proj", "lang_embedding")
GPT_2_0_MODULES = ("conditioning_encoder", "perceiver_encoder", "speed_emb")
CODEC_2_5_MODULES = ("down", "up")
KIND_LABELS = {"gpt": "GPT", "semantic-codec": "semantic codec"}


class Unsupported(ConvertError):
    """A checkpoint of a release this tool does not convert (IndexTTS 1.x)."""


def label(version: str) -> str:
    return f"IndexTTS-{version}"


def _has(names, prefix: str) -> bool:
    return any(n.startswith(prefix) for n in names)


def gpt_version(names) -> tuple[str | None, str]:
    """(version, why) from a gpt checkpoint's tensor names; (None, why) when they are
    not a GPT's.  IndexTTS 1.x is refused (:class:`Unsupported`)."""
    names = list(names)
    new = [p for p in GPT_2_5_MODULES if _has(names, p + ".")]
    old = [p for p in GPT_2_0_MODULES if _has(names, p + ".")]
    if new and old:
        raise ConvertError(f"the GPT checkpoint mixes IndexTTS-2.5 tensors ({', '.join(new)}) with IndexTTS-2.0 ones "
                           f"({', '.join(old)}); it is neither release's UnifiedVoice")
    if new:
        return "2.5", f"its tensors: {', '.join(new)} (UnifiedVoice in campplus mode)"
    if _has(names, "conditioning_encoder.") and not _has(names, "emo_conditioning_encoder."):
        raise Unsupported("an IndexTTS 1.x GPT (a speaker conditioning encoder and no emotion encoder): unsupported; "
                          "this tool converts IndexTTS-2.0 and IndexTTS-2.5 releases")
    if _has(names, "conditioning_encoder.") and _has(names, "emo_conditioning_encoder."):
        return "2.0", "its tensors: conditioning_encoder and emo_conditioning_encoder (UnifiedVoice v2)"
    return None, "no GPT conditioning tensors"


def codec_version(names) -> tuple[str, str]:
    names = list(names)
    if any(_has(names, p + ".") for p in CODEC_2_5_MODULES):
        return "2.5", "its tensors: the down/up resampling convs (EnhancedCodec, codec.pth)"
    return "2.0", "its tensors: no down/up resampling convs (MaskGCT RepCodec)"


def _listing(items, last: str) -> str:
    items = [f"{i}.*" for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def evidence(kind: str, names) -> str | None:
    """The tensors that tell a ``kind`` checkpoint's release, for messages ("it has
    spk_emb_proj.* and lang_embedding.*, no conditioning_encoder.*, ..."); None where
    they do not tell it (a model whose layout is the same in both, a GPT without
    either release's conditioning modules)."""
    names = list(names)
    if kind == "gpt":
        modules = GPT_2_5_MODULES + GPT_2_0_MODULES
    elif kind == "semantic-codec":
        modules = CODEC_2_5_MODULES
    else:
        return None
    has = [m for m in modules if _has(names, m + ".")]
    lacks = [m for m in modules if m not in has]
    if kind == "gpt" and not has:
        return None
    if not has:
        return f"it has no {_listing(lacks, 'or')}"
    return f"it has {_listing(has, 'and')}" + (f", no {_listing(lacks, 'or')}" if lacks else "")


def release_folder(src_file: str) -> str | None:
    """The release folder a source sits in: the nearest folder at most three levels up
    (``hf_cache/w2v-bert-2.0/model.safetensors``, ``MaskGCT/semantic_codec/...``) that
    has a ``config.yaml`` and a ``gpt.pth`` or ``s2mel.pth``."""
    d = os.path.dirname(os.path.abspath(src_file))
    for _ in range(4):
        if os.path.isfile(os.path.join(d, "config.yaml")) and any(
                os.path.isfile(os.path.join(d, n)) for n in ("gpt.pth", "s2mel.pth")):
            return d
        up = os.path.dirname(d)
        if up == d:
            break
        d = up
    return None


def release_version(folder: str) -> tuple[str, str]:
    """(version, why) of a release folder from the files in it."""
    marks = [n for n in MARKERS_2_5 if os.path.isfile(os.path.join(folder, n))]
    if marks:
        return "2.5", f"{folder} has {' and '.join(marks)}"
    old = [n for n in MARKERS_1_X if os.path.isfile(os.path.join(folder, n))]
    if old:
        raise Unsupported(f"{folder}: an IndexTTS 1.x release ({', '.join(old)}): unsupported; this tool converts "
                          "IndexTTS-2.0 and IndexTTS-2.5 releases")
    return "2.0", f"{folder} has neither {' nor '.join(MARKERS_2_5)}"


def detect(kind: str, names, src_file: str) -> tuple[str, str]:
    """(version, why) for a ``kind`` checkpoint with these tensor names at ``src_file``."""
    if kind == "gpt":
        v, why = gpt_version(names)
        if v is not None:
            return v, why
    if kind == "semantic-codec":
        return codec_version(names)
    folder = release_folder(src_file)
    if folder is None:
        return DEFAULT, "no release folder around it, and its layout is the same in both releases"
    v, why = release_version(folder)
    return v, f"the release folder: {why}"


def section(kind: str, version: str, sections) -> str:
    """The schema (or reference) section of ``kind`` at ``version``: ``kind@version``
    where ``sections`` has one, else ``kind``."""
    key = f"{kind}@{version}"
    return key if key in sections else kind


def file_version(metadata: dict) -> str:
    """A canonical file's family version: its metadata's, or 2.0 for files made before
    the key existed (schema 2.0)."""
    return metadata.get("family_version") or DEFAULT
