"""Reading upstream config files (IndexTTS-2's config.yaml, Hugging Face config.json)."""

from __future__ import annotations

import json

from ..errors import ConvertError
from .files import regular_file


def parse_yaml(f):
    """``yaml.safe_load``, with libyaml's parser where PyYAML was built with it (the same
    safe constructor; the pure-Python parser is ~10x slower on a release config)."""
    import yaml

    return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_yaml_section(path: str, section: str) -> dict:
    """One top-level section of a YAML config (``gpt:``, ``s2mel:``), plus the whole
    document under ``"_root"`` for keys that live at the top level."""
    import yaml

    try:
        regular_file(path)  # a FIFO or a device is refused, never opened
        with open(path) as f:
            doc = parse_yaml(f)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read config: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConvertError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(section), dict):
        raise ConvertError(f"{path}: config has no {section!r} section")
    return {**doc[section], "_root": doc}


def load_json(path: str) -> dict:
    try:
        regular_file(path)  # a FIFO or a device is refused, never opened
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read config: {e.strerror}") from None
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: config is not a JSON object")
    return cfg


def require(cfg: dict, keys, path: str, what: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConvertError(f"{path}: {what} config lacks {', '.join(missing)}")
