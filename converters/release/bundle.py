"""Release files a runtime needs that are not converted: copied into the bundle as they are.

- ``tokenizer``: the text tokenizer, ``config.yaml`` ``dataset.bpe_model`` (``bpe.model``,
  SentencePiece BPE; infer_v2 ``_load_text``).  IndexTTS-2.5's is
  ``multilingual_zh_ja_yue_char_del.tiktoken``, a name no config key gives: upstream's
  ``get_tokenizer(multilingual=True, model_dir=...)`` hard-codes it (the 2.5 config still
  says ``dataset.bpe_model: bpe.model``, which infer_v2_5 never reads)
- ``emotion_classifier``: the Qwen text-to-emotion model, ``config.yaml`` ``qwen_emo_path``
  (``qwen0.6bemo4-merge/``, already Hugging Face safetensors; infer_v2 ``QwenEmotion``),
  copied folder and all

Each file is hard-linked into OUT where the filesystem allows it (same bytes, no space),
else copied atomically.  The manifest records per role the source, and per file its
size and sha256 (``check --hash`` re-hashes them).  A release without one of them is
converted as before, and the manifest's ``absent`` says what is missing and why.  A FIFO,
a device or a socket among them is refused as not a regular file, never opened.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from ..errors import ConvertError
from ..io.files import file_kind, not_regular, regular_file


@dataclass(frozen=True)
class Copied:
    role: str
    config_key: tuple[str, ...]  # where config.yaml names it (relative to the release folder)
    description: str
    fixed: str | None = None  # a name upstream hard-codes instead (no config key)


COPIED = [
    Copied("tokenizer", ("dataset", "bpe_model"), "text tokenizer (SentencePiece BPE model); ids as the GPT's text tokens"),
    Copied("emotion_classifier", ("qwen_emo_path",),
           "Qwen text-to-emotion classifier (Hugging Face transformers folder, safetensors); copied unconverted"),
]
COPIED_2_5 = [
    Copied("tokenizer", (), "text tokenizer (tiktoken BPE ranks, upstream get_tokenizer(multilingual=True)); ids as the "
           "GPT's text tokens, special tokens as manifest pipeline.tokens.tokenizer says",
           fixed="multilingual_zh_ja_yue_char_del.tiktoken"),
    COPIED[1],
]


def copied(version: str = "2.0") -> list[Copied]:
    return COPIED_2_5 if version == "2.5" else COPIED


def named(doc: dict, key: tuple[str, ...]):
    node = doc
    for k in key:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node if isinstance(node, str) and node.strip() else None


def find(release_dir: str, doc: dict, version: str = "2.0") -> tuple[dict[str, tuple[str, list[str]]], dict[str, str]]:
    """({role: (relative name, [relative file paths])}, {role: why absent})."""
    found, absent = {}, {}
    for c in copied(version):
        rel = c.fixed or named(doc, c.config_key)
        key = ".".join(c.config_key) if not c.fixed else "upstream's get_tokenizer"
        if c.fixed and not regular_file(os.path.join(release_dir, rel)):
            absent[c.role] = f"{rel} (the name {key} reads) is not in the release folder"
            continue
        if rel is None:
            absent[c.role] = f"config.yaml has no {key}"
            continue
        rel = rel.strip().rstrip("/")
        if os.path.isabs(rel) or ".." in rel.split("/"):
            absent[c.role] = f"config.yaml {key} is {rel!r}, not a path inside the release folder"
            continue
        src = os.path.join(release_dir, rel)
        kind = file_kind(src)
        if kind == "file":
            found[c.role] = (rel, [rel])
        elif kind == "folder":
            files = sorted(os.path.relpath(os.path.join(d, f), release_dir)
                           for d, _, fs in os.walk(src) for f in fs if not f.startswith("."))
            for f in files:
                if file_kind(os.path.join(release_dir, f)) not in ("file", None):
                    raise not_regular(os.path.join(release_dir, f), expected=f"a file of the {c.role}")
            if not files:
                absent[c.role] = f"{rel}/ (config.yaml {key}) is an empty folder"
                continue
            found[c.role] = (rel, files)
        elif kind is not None:
            raise not_regular(src, expected=f"the {c.role}")
        else:
            absent[c.role] = f"{rel} (config.yaml {key}) is not in the release folder"
    return found, absent


def place(src: str, dst: str) -> str:
    """Put ``src``'s bytes at ``dst`` atomically: a hard link where possible, else a
    copy.  Returns how."""
    from ..io.safetensors_io import AtomicOutput

    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return "linked"
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{os.getpid()}.link")
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        return "linked"
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    try:
        with open(src, "rb") as f, AtomicOutput(dst) as out:
            shutil.copyfileobj(f, out.file, 16 << 20)
            out.commit()
    except OSError as e:
        raise ConvertError(f"{dst}: cannot copy {src}: {e.strerror or e}") from None
    return "copied"
