"""Tiny upstream MaskGCT semantic codec (``RepCodec``), as IndexTTS-2 builds it.

``indextts.utils.maskgct_utils`` imports transformers' Wav2Vec2BertModel and the codec's
``kmeans/vocos.py`` does ``from torchaudio.functional.functional import _hz_to_mel,
_mel_to_hz``.  torchaudio cannot be installed beside our torch, and those two mel
helpers are only used by vocos.py's mel/MDCT front ends, never by ``VocosBackbone`` or
anything else ``RepCodec`` builds.  So :func:`module` imports ``repcodec_model`` directly
(the class ``build_semantic_codec`` instantiates) with a stub ``torchaudio`` in
``sys.modules`` for the duration of that import only, then removes the stub again (so
transformers' own torchaudio probing is not fooled).  The stub's helpers raise if called.
The import lives in :mod:`converters.cli.forward`, which ``verify --forward`` uses too.
"""

from __future__ import annotations

import os

import torch
import yaml

# The released semantic_codec section's keys at tiny sizes (hidden_size != codebook_dim,
# so the quantizer has its weight-normed in/out projections).
TINY = {"codebook_size": 32, "hidden_size": 16, "codebook_dim": 4, "vocos_dim": 12,
        "vocos_intermediate_dim": 20, "vocos_num_layers": 2}


def module():
    """repcodec_model, imported with the torchaudio stub (:func:`converters.cli.forward.repcodec_module`)."""
    from converters.cli.forward import repcodec_module

    return repcodec_module()


def build(config: dict | None = None, seed: int = 0):
    """RepCodec(cfg=...) with random weights: weight-norm g far from ||v||, LayerNorm
    affines, layer scales and biases all non-trivial."""
    import warnings

    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        m = module().RepCodec(cfg=OmegaConf.create(dict(config or TINY)))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight_g"):
                p.copy_(torch.rand_like(p) * 2 + 0.5)
            elif name.endswith("gamma") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            elif name.endswith("codebook.weight"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return m.eval()


def save_release(m, folder: str, config: dict | None = None, write_config: bool = True) -> str:
    """semantic_codec/model.safetensors as the HF repo has it (safetensors.torch.save_model,
    which upstream's load_model mirrors), and a config.yaml with the semantic_codec section."""
    from safetensors.torch import save_model

    d = os.path.join(folder, "semantic_codec")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.safetensors")
    save_model(m, path)
    if write_config:
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            yaml.safe_dump({"semantic_codec": dict(config or TINY)}, f)
    return path


def folded(m):
    """The codec with weight norm removed from the quantizer projections (in place)."""
    from torch.nn.utils import remove_weight_norm

    for mod in m.modules():
        if hasattr(mod, "weight_g"):
            remove_weight_norm(mod)
    return m


# The demo's codebook has one row per plain GPT mel code (the demo GPT has 18 codes, two
# of them start/stop), as the release's 8192 rows match its 8194 codes.
DEMO = {**TINY, "codebook_size": 16}


def demo_config() -> dict:
    return {"semantic_codec": dict(DEMO)}


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/MaskGCT/semantic_codec/model.safetensors (the HF repo's layout; upstream
    downloads it from amphion/MaskGCT)."""
    save_release(build(config.get("semantic_codec", DEMO), seed=2026), os.path.join(release_dir, "MaskGCT"),
                 write_config=False)
