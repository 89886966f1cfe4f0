"""s2mel's upstream adapter: indextts2-inference's ``MyModel`` (the flow-matching DiT,
the length regulator and the GPT-latent layer)."""

from __future__ import annotations

import functools

from ...errors import ConvertError
from .common import (as_omegaconf, config_section, indextts, is_safetensors, need_config_reader, quiet,
                     safetensors_state)

S2MEL_SUBMODULES = ("cfm", "length_regulator", "gpt_layer")


def s2mel_model(path: str, cfg):
    """As infer_v2 loads it: ``MyModel(cfg.s2mel, use_gpt_latent=True)``, then
    ``load_checkpoint2`` (each ``net`` sub-dict, the DDP ``module.`` prefix stripped,
    loaded non-strictly), the estimator's caches, eval.  load_checkpoint2 skips what it
    cannot load without a word, so a parameter it leaves at its random init is refused
    here.  A flat safetensors dump (``cfm.…``, ``length_regulator.…``, ``gpt_layer.…``),
    which upstream has no reader for, is split per sub-model and loaded strictly."""
    import torch

    c = indextts("s2mel.modules.commons")
    with quiet():
        m = c.MyModel(as_omegaconf(cfg), use_gpt_latent=True)
    if is_safetensors(path):
        flat = safetensors_state(path)
        for key in S2MEL_SUBMODULES:
            p = key + "."
            sd = {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}
            sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
            m.models[key].load_state_dict(sd, strict=True)
        m.eval()
    else:
        missing: dict[str, list[str]] = {}

        def recording(key, sub, sd, strict=True, **kw):
            r = torch.nn.Module.load_state_dict(sub, sd, strict=strict, **kw)
            missing[key] = list(r.missing_keys)
            return r

        for key, sub in m.models.items():
            sub.load_state_dict = functools.partial(recording, key, sub)
        try:
            with quiet():
                c.load_checkpoint2(m, None, str(path), load_only_params=True, ignore_modules=[], is_distributed=False)
        finally:
            for sub in m.models.values():
                del sub.load_state_dict
        unloaded = [k for k in m.models if k not in missing] + [f"{k}.{n}" for k, ns in missing.items() for n in ns]
        if unloaded:
            raise ConvertError(f"{path}: upstream's load_checkpoint2 left {len(unloaded)} tensors at their random init "
                               f"(absent or of another shape): {', '.join(unloaded[:5])}")
    m.models["cfm"].estimator.setup_caches(max_batch_size=1, max_seq_length=8192)
    return m.to(torch.float32)


def s2mel_run(m, name: str, x: dict, config=None) -> dict:
    import torch

    with torch.no_grad():
        if name == "gpt_layer":
            return {"out": m.models["gpt_layer"](x["latent"])}
        if name == "length_regulator":
            return {"cond": m.models["length_regulator"](x["x"], ylens=x["ylens"], n_quantizers=3, f0=None)[0]}
        if name == "dit":
            return {"dphi_dt": m.models["cfm"].estimator(x["x"], x["prompt_x"], x["x_lens"], x["t"], x["style"], x["cond"])}
    raise ConvertError(f"s2mel: no upstream call for reference entry {name!r}")


def imports() -> None:
    need_config_reader()
    indextts("s2mel.modules.commons")
    indextts("s2mel.modules.flow_matching")
    indextts("s2mel.modules.length_regulator")


def load(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    return s2mel_model(src_file, config_section(cfg_file, "s2mel")), "MyModel(cfg.s2mel, use_gpt_latent=True) + " + (
        "strict load_state_dict per sub-model of the safetensors dump (upstream's load_checkpoint2 reads torch files only)"
        if is_safetensors(src_file) else "load_checkpoint2")
