"""BigVGAN's upstream adapter: indextts2-inference's vendored ``BigVGAN``."""

from __future__ import annotations

import os

from ...errors import ConvertError
from .common import indextts, is_safetensors, quiet, safetensors_state


def _native(path: str, config_json: str) -> bool:
    """The file and config ``from_pretrained`` would read itself: a folder's
    ``bigvgan_generator.pt`` and the config.json beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.basename(path) == "bigvgan_generator.pt" and \
        os.path.abspath(config_json) == os.path.join(folder, "config.json")


def bigvgan_model(path: str, config_json: str):
    """As infer_v2 loads it: ``BigVGAN.from_pretrained(folder)`` (the folder's
    config.json and ``bigvgan_generator.pt``), ``remove_weight_norm()``, eval.  Any
    other file or config (a safetensors dump, --config) is loaded the way the body of
    from_pretrained does it: ``BigVGAN(load_hparams_from_json(config))`` and
    ``load_state_dict``."""
    import torch

    bv = indextts("s2mel.modules.bigvgan.bigvgan")
    with quiet():
        if _native(path, config_json):
            m = bv.BigVGAN.from_pretrained(os.path.dirname(os.path.abspath(path)), use_cuda_kernel=False)
        else:
            m = bv.BigVGAN(bv.load_hparams_from_json(config_json), use_cuda_kernel=False)
            sd = safetensors_state(path) if is_safetensors(path) else torch.load(path, map_location="cpu")["generator"]
            m.load_state_dict(sd)
        m.remove_weight_norm()
    return m.eval().to(torch.float32)


def bigvgan_run(m, name: str, x: dict, config=None) -> dict:
    """The waveform, plus ``conv_post``'s output ahead of the clamp (which the reference
    records as an activation): a waveform pinned at +-1 almost everywhere hides most
    differences."""
    import torch

    if name == "vocode":
        seen = {}
        hook = m.conv_post.register_forward_hook(lambda mod, i, o: seen.setdefault("conv_post", o))
        try:
            with torch.no_grad():
                wav = m(x["mel"])
        finally:
            hook.remove()
        return {"waveform": wav, "conv_post": seen["conv_post"]}
    raise ConvertError(f"bigvgan: no upstream call for reference entry {name!r}")


def imports() -> None:
    indextts("s2mel.modules.bigvgan.bigvgan")


def load(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    how = "BigVGAN.from_pretrained" if _native(src_file, cfg_file) else \
        "BigVGAN(load_hparams_from_json(config)) + load_state_dict, as from_pretrained does"
    return bigvgan_model(src_file, cfg_file), how + " + remove_weight_norm()"
