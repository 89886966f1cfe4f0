"""CAMPPlus's upstream adapter: indextts2-inference's ``DTDNN.CAMPPlus``."""

from __future__ import annotations

import json

from ...errors import ConvertError
from .common import indextts

INFER_V2_CAMPPLUS = {"feat_dim": 80, "embedding_size": 192}  # infer_v2: CAMPPlus(feat_dim=80, embedding_size=192)


def campplus_model(path: str, args: dict | None = None):
    """As infer_v2 loads it: ``CAMPPlus(feat_dim=80, embedding_size=192)`` (a
    campplus.json's arguments override those), a strict
    ``load_state_dict(torch.load(path))``, eval."""
    import torch

    dt = indextts("s2mel.modules.campplus.DTDNN")
    m = dt.CAMPPlus(**{**INFER_V2_CAMPPLUS, **(args or {})})
    m.load_state_dict(torch.load(path, map_location="cpu"))
    return m.eval().to(torch.float32)


def campplus_run(m, name: str, x: dict, config=None) -> dict:
    import torch

    if name == "embed":
        with torch.no_grad():
            return {"style": m(x["feat"])}
    raise ConvertError(f"campplus: no upstream call for reference entry {name!r}")


def imports() -> None:
    indextts("s2mel.modules.campplus.DTDNN")


def load(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    args = None
    if cfg_file is not None:
        with open(cfg_file) as f:
            args = json.load(f)
    return campplus_model(src_file, args), "CAMPPlus(**args) + load_state_dict(torch.load(...))"
