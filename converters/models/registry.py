"""What exists, as plain data (no torch import, so the CLI and ``check`` start fast).

- ``MODELS``: model kind -> the module under ``converters/`` that converts it
- ``EXTRA_FILES``: per model, extra source files a command takes as options
  (``--stats`` for w2v-bert): option -> (help, file name inside a release folder)
- ``CHOICES``: per model, options that change the canonical form: option ->
  (allowed values, default, help); passed to the module's ``runtime_config``
- ``SOURCE_FILES``, ``CONFIG_FILES`` and :func:`locate`: where a model's checkpoint
  and config are found (torch-free, so the CLI can start hashing the source before
  it imports torch)
- :func:`converter_fingerprint`: what shapes a model's output, hashed (``all``'s up-to-date test)
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from functools import lru_cache

from ..errors import ConvertError
from ..io.files import file_kind, not_regular, regular_file

CONVERTER_VERSION = "0.1.0"
# Bump when the bytes the writer lays out for the same tensors change (header encoding,
# padding, data order); part of every output's fingerprint.
WRITER_FORMAT = 1
# Modules every conversion's output depends on besides the model's own: the op code, the
# table resolution, the template expander and the config readers.
SHARED_MODULES = ("format/arrays", "format/ops", "format/opspec", "format/table", "format/templates", "io/configs")

MODELS: dict[str, str] = {
    "gpt": "converters.models.gpt",
    "s2mel": "converters.models.s2mel",
    "w2v-bert": "converters.models.w2v_bert",
    "bigvgan": "converters.models.bigvgan",
    "speaker-matrix": "converters.models.speaker_matrix",
    "emotion-matrix": "converters.models.emotion_matrix",
    "semantic-codec": "converters.models.semantic_codec",
    "campplus": "converters.models.campplus",
}

# Models whose layout differs in a release version: (kind, family version) -> module.
# The other versions use MODELS[kind].
VERSIONED: dict[tuple[str, str], str] = {
    ("gpt", "2.5"): "converters.models.gpt_v2_5",
    ("semantic-codec", "2.5"): "converters.models.semantic_codec_v2_5",
}


def module_name(kind: str, family_version: str = "2.0") -> str:
    return VERSIONED.get((kind, family_version), MODELS[kind])


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
    "semantic-codec": ("model.safetensors", "semantic_codec.safetensors", "codec.pth"),
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
    """The source file and config for a per-model SRC that may be a file or a folder.
    A checkpoint or config that is there but is not a regular file is refused."""
    what = file_kind(src)
    if what == "folder":
        for name in SOURCE_FILES[kind]:
            p = os.path.join(src, name)
            if regular_file(p):
                src_file = p
                break
        else:
            raise ConvertError(f"{src}: no {kind} checkpoint in this folder (looked for {', '.join(SOURCE_FILES[kind])})")
    elif what == "file":
        src_file = src
    elif what is not None:
        raise not_regular(src)
    else:
        raise ConvertError(f"{src}: no such file or folder")
    name, optional = CONFIG_FILES[kind]
    cfg = config or os.path.join(os.path.dirname(os.path.abspath(src_file)), name)
    if not config and optional and not regular_file(cfg):
        return src_file, None  # no config file: the module's load_config(None) gives upstream's fixed values
    if need_config and not regular_file(cfg):
        raise ConvertError(f"{cfg}: config not found (the {kind} converter reads {name} beside the source; pass --config)")
    return src_file, cfg


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # converters/


def _module_file(name: str) -> str:
    """The file of a module named by its path under ``converters/`` ("models/gpt")."""
    return os.path.join(_PACKAGE, name + ".py")


def _local_imports(name: str) -> list[str]:
    """The modules of this package that a converter module imports, by their paths
    under ``converters/``: ``from .x import`` (the same subpackage) and ``from ..sub.x
    import`` (another one); a name that is not a module file (``from . import``'s
    attributes, a subpackage) is left out."""
    here = os.path.dirname(name)
    path = _module_file(name)
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.level in (1, 2) and n.module:
            base = here if n.level == 1 else ""
            found.add(os.path.join(base, *n.module.split(".")))
    return sorted(m for m in found if os.path.isfile(_module_file(m)))


@lru_cache(maxsize=None)
def converter_fingerprint(kind: str, family_version: str = "2.0") -> str:
    """sha256 over what shapes ``kind``'s canonical output: its converter module and the
    converter modules it imports, the shared op, table and config code, the model's
    schema section and the writer format.  Torch-free.  ``all`` redoes an output
    whose recorded fingerprint differs, so a changed table or op never leaves an old
    file called "up to date"."""
    from ..format.schema import model_spec

    own = module_name(kind, family_version).removeprefix("converters.").replace(".", "/")
    names = sorted({own, *SHARED_MODULES, *_local_imports(own)})
    h = hashlib.sha256()
    for name in names:
        with open(_module_file(name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    spec = model_spec(kind) if family_version == "2.0" else model_spec(kind, family_version)
    h.update(json.dumps(spec, sort_keys=True).encode())
    h.update(f"writer format {WRITER_FORMAT}".encode())
    return h.hexdigest()
