"""The semantic codec's upstream adapters: IndexTTS-2's RepCodec (indextts2-inference's
``build_semantic_codec``) and IndexTTS-2.5's decoding-half ``EnhancedCodec``
(indextts25-inference)."""

from __future__ import annotations

from ...errors import ConvertError
from .common import (as_omegaconf, config_section, indextts, indextts25, is_safetensors, need, need_config_reader,
                     quiet, repcodec_module, safetensors_state)

# ------------------------------------------------------------------ IndexTTS-2


def semantic_codec_model(path: str, cfg):
    """As infer_v2 loads it: ``build_semantic_codec(cfg.semantic_codec)`` and a strict
    ``safetensors.torch.load_model``, eval; weight norm stays in place."""
    import torch

    st = need("safetensors.torch", "semantic codec (safetensors)")
    repcodec_module()
    build = indextts("utils.maskgct_utils").build_semantic_codec
    with quiet():
        codec = build(as_omegaconf(cfg))
    st.load_model(codec, str(path))
    return codec.eval().to(torch.float32)


def semantic_codec_run(codec, name: str, x: dict, config=None) -> dict:
    """``quantize``: ``RepCodec.quantize(x)``.  ``vq2emb``: infer_v2's
    ``quantizer.vq2emb(codes.unsqueeze(1))``, on codes of shape ``[1, T]``."""
    import torch

    with torch.no_grad():
        if name == "quantize":
            codes, quantized = codec.quantize(x["x"])
            return {"codes": codes, "quantized": quantized}
        if name == "vq2emb":
            return {"emb": codec.quantizer.vq2emb(x["codes"].unsqueeze(1))}
    raise ConvertError(f"semantic-codec: no upstream call for reference entry {name!r}")


def imports() -> None:
    need_config_reader()
    need("transformers", "w2v-bert (transformers)")
    need("safetensors.torch", "safetensors")
    repcodec_module()
    indextts("utils.maskgct_utils")


def load(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    return semantic_codec_model(src_file, config_section(cfg_file, "semantic_codec")), \
        "build_semantic_codec(cfg.semantic_codec) + safetensors.torch.load_model"


# ------------------------------------------------------------------ IndexTTS-2.5

ENHANCED_CODEC_ARGS = ("codebook_size", "hidden_size", "codebook_dim", "vocos_dim", "vocos_intermediate_dim",
                       "vocos_num_layers")


def semantic_codec_2_5_model(path: str, cfg):
    """infer_v2_5 builds ``EnhancedCodec(**cfg.semantic_codec, cfg=cfg.semantic_codec)``
    and calls its ``load_checkpoint(codec.pth)``.  indextts25-inference's
    ``EnhancedCodec``, which keeps only the decoder, stands in for it: built from its six
    size arguments and loaded by its own ``load_checkpoint`` (the ``model`` dict, weight
    norm folded, missing keys refused).  A safetensors dump of that state dict is folded
    by the package's ``fold_weight_norm`` and loaded the same way."""
    import torch

    cm = indextts25("codec.models")
    args = {k: cfg[k] for k in ENHANCED_CODEC_ARGS if k in cfg}
    if int(cfg.get("num_quantizers", 1)) != 1:
        raise ConvertError("indextts25-inference's EnhancedCodec has one quantizer; this config asks for "
                           f"{cfg.get('num_quantizers')}")
    m = cm.EnhancedCodec(**args)
    if is_safetensors(path):
        sd = indextts25("utils.checkpoint").fold_weight_norm(safetensors_state(path), "cpu")
        missing = m.load_state_dict(sd, strict=False).missing_keys
        if missing:
            raise ConvertError(f"{path}: missing {len(missing)} keys upstream needs, e.g. {missing[:5]}")
    else:
        m.load_checkpoint(str(path))
    return m.eval().to(torch.float32)


def semantic_codec_2_5_run(codec, name: str, x: dict, config=None) -> dict:
    import torch

    with torch.no_grad():
        if name == "vq2emb":
            return {"emb": codec.quantizer.vq2emb(x["codes"].unsqueeze(1))}
        if name == "decode":
            return {"features": codec.decode(x["codes"])}
    raise ConvertError(f"semantic-codec (IndexTTS-2.5): no upstream call for reference entry {name!r}")


def imports_2_5() -> None:
    need_config_reader()
    indextts25("codec.models")
    indextts25("utils.checkpoint")


def load_2_5(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    return semantic_codec_2_5_model(src_file, config_section(cfg_file, "semantic_codec")), \
        "indextts25 EnhancedCodec(**cfg.semantic_codec) + its load_checkpoint (codec.pth 'model', weight norm folded)"
