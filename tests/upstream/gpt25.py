"""Tiny upstream IndexTTS-2.5 GPT, saved in the release's layout.

The oracle class is ``indextts25.gpt.model_v2.UnifiedVoice`` from the PyPI package
``indextts25-inference`` 0.2.0 (IndexTTS-2.5's trimmed model code).  Its layout is
upstream's ``indextts/gpt/model_v2_5.py`` (and ``model_v2.py`` with
``spk_cond_mode="campplus"``, which infer_v2_5 builds) less ``text_head``, which the
package does not build: :func:`release_state_dict` adds a ``text_head`` Linear
(``model_dim -> number_text_tokens * types + 1``, upstream's shape, placed before
``mel_head`` as upstream registers it), so the saved file has the release's 456-tensor
layout.  The emotion Conformer's ``pe`` buffer is rounded through bfloat16, as the
released gpt.pth stores it (upstream loads and runs with the stored values).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch

from . import gpt as v2

# 2.0's tiny gpt: section (the 2.5 config keeps condition_module, which 2.5 ignores).
TINY = v2.config()


def module():
    from converters.cli.forward import indextts25

    return indextts25("gpt.model_v2")


config = v2.config  # the same tiny gpt: section, with overrides


def build(cfg: dict | None = None, seed: int = 0):
    """An indextts25 UnifiedVoice with random weights everywhere, the emotion Conformer's
    ``pe`` rounded through bfloat16, in eval mode; ``m.text_head`` is added (a random
    Linear, as the release stores one)."""
    mv = module()
    cfg = cfg or TINY
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

        transformers.logging.set_verbosity_error()
        m = mv.UnifiedVoice(**cfg)
    v2.randomize(m)  # the same draws in the same order as before: the 2.5 demo stays byte-identical
    with torch.no_grad():
        pe = m.emo_conditioning_encoder.embed.pos_enc.pe
        pe.copy_(pe.to(torch.bfloat16).to(pe.dtype))
        add_text_head(m, cfg)
        m.text_head.weight.copy_(torch.randn_like(m.text_head.weight) / int(cfg["model_dim"]) ** 0.5)
        m.text_head.bias.copy_(0.2 * torch.randn_like(m.text_head.bias))
    return m.eval()


def add_text_head(m, cfg: dict):
    """``m.text_head``: upstream's Linear ``model_dim -> number_text_tokens * types + 1``
    (built in the current device context: on the meta device for the full-size bench)."""
    rows = int(cfg["number_text_tokens"]) * int(cfg.get("types", 1)) + 1
    m.text_head = torch.nn.Linear(int(cfg["model_dim"]), rows)
    return m


def release_state_dict(m) -> dict:
    """The release's state dict: the module's, with ``text_head`` before ``mel_head``."""
    out = {}
    for k, v in m.state_dict().items():
        if k.startswith("text_head."):
            continue
        if k == "mel_head.weight":
            out["text_head.weight"] = m.text_head.weight.detach().clone()
            out["text_head.bias"] = m.text_head.bias.detach().clone()
        out[k] = v
    return out


write_config = v2.write_config  # the same gpt: section (TINY is 2.0's)


def save_release(m, folder: str, cfg: dict | None = None, fmt: str = "pth", dtype: torch.dtype | None = None) -> str:
    """As :func:`tests.upstream.gpt.save_release`, in 2.5's layout."""
    return v2.save_release(m, folder, cfg, fmt, dtype, state_dict=release_state_dict, config_writer=write_config)


# ------------------------------------------------------------------ demo release

DEMO = copy.deepcopy(v2.DEMO)


def demo_config() -> dict:
    return {"gpt": copy.deepcopy(DEMO)}


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/gpt.pth as a plain state dict, float16 (as the 2.0 demo: the emotion
    perceiver runs at dim 1024 whatever the config says)."""
    m = build(config.get("gpt", DEMO), seed=0)
    sd = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in release_state_dict(m).items()}
    os.makedirs(release_dir, exist_ok=True)
    torch.save(sd, os.path.join(release_dir, "gpt.pth"))
