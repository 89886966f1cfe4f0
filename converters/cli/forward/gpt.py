"""The GPT's upstream adapters: IndexTTS-2's ``UnifiedVoice`` (indextts2-inference) and
IndexTTS-2.5's (indextts25-inference)."""

from __future__ import annotations

from ...errors import ConvertError
from .common import config_section, indextts, indextts25, is_safetensors, need_config_reader, quiet, safetensors_state

# ------------------------------------------------------------------ IndexTTS-2


def gpt_model(path: str, cfg):
    """As infer_v2 loads it: ``UnifiedVoice(**cfg.gpt)``, then
    ``utils.checkpoint.load_checkpoint`` (``torch.load`` and a strict
    ``load_state_dict``).  A safetensors dump of that state dict, which upstream's loader
    cannot open, is read with safetensors and loaded just as strictly."""
    import torch

    mv = indextts("gpt.model_v2")
    ckpt = indextts("utils.checkpoint")
    with quiet():
        m = mv.UnifiedVoice(**cfg)
    if is_safetensors(path):
        m.load_state_dict(safetensors_state(path), strict=True)
    else:
        ckpt.load_checkpoint(m, str(path))
    return m.eval().to(torch.float32)


def gpt_run(m, name: str, x: dict, config=None) -> dict:
    import torch

    seen = {}
    hook = m.final_norm.register_forward_hook(lambda mod, i, o: seen.setdefault("final_norm", o))
    try:
        with torch.no_grad():
            if name == "conditioning":
                return {"latents": m.get_conditioning(x["feats"], x["lengths"])}
            if name == "emovec":
                return {"emovec": m.get_emovec(x["feats"].transpose(1, 2), x["lengths"])}
            if name == "merge_emovec":
                return {"emovec": m.merge_emovec(x["spk_feats"].transpose(1, 2), x["emo_feats"].transpose(1, 2),
                                                 x["spk_lengths"], x["emo_lengths"], alpha=float(x["alpha"]))}
            if name == "forward_latents":
                b = x["text"].shape[0]
                lat = m(x["cond_latents"], x["text"].clone(), x["text_lengths"], x["codes"].clone(), x["code_lengths"],
                        None, emo_vec=x["emo_vec"], use_speed=torch.zeros(b, dtype=torch.long))
                mel = seen["final_norm"][:, -(x["codes"].shape[1] + 2):]  # get_logits' second_inputs slice
                return {"latents": lat, "mel_logits": m.mel_head(mel)}
    finally:
        hook.remove()
    raise ConvertError(f"gpt: no upstream call for reference entry {name!r}")


def imports() -> None:
    need_config_reader()
    indextts("gpt.model_v2")
    indextts("utils.checkpoint")


def load(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    return gpt_model(src_file, config_section(cfg_file, "gpt")), "UnifiedVoice(**cfg.gpt) + " + (
        "strict load_state_dict of the safetensors dump (upstream's load_checkpoint reads torch files only)"
        if is_safetensors(src_file) else "utils.checkpoint.load_checkpoint")


# ------------------------------------------------------------------ IndexTTS-2.5


def gpt_2_5_model(path: str, cfg):
    """infer_v2_5 builds ``UnifiedVoice(**cfg.gpt, spk_cond_mode="campplus")`` and calls
    ``load_checkpoint``.  indextts25-inference's ``UnifiedVoice(**cfg.gpt)`` stands in
    for it, loaded by that package's ``utils.checkpoint.load_checkpoint`` (it skips
    ``text_head``, which this GPT lacks, and refuses a missing key); then
    ``post_init_gpt2_config()`` builds the ``GPT2InferenceModel`` that ``generate`` runs.
    A safetensors dump goes the same way: unexpected keys ignored, missing ones refused."""
    import torch

    mv = indextts25("gpt.model_v2")
    ckpt = indextts25("utils.checkpoint")
    with quiet():
        m = mv.UnifiedVoice(**cfg)
    if is_safetensors(path):
        missing = m.load_state_dict(safetensors_state(path), strict=False).missing_keys
        if missing:
            raise ConvertError(f"{path}: missing {len(missing)} keys upstream needs, e.g. {missing[:5]}")
    else:
        ckpt.load_checkpoint(m, str(path))
    m = m.eval().to(torch.float32)
    with quiet():
        m.post_init_gpt2_config()
    return m


def gpt_2_5_run(m, name: str, x: dict, config=None) -> dict:
    import torch

    with torch.no_grad():
        if name == "conditioning":
            return {"latents": m.spk_emb_proj(x["style"]).unsqueeze(1)}
        if name in ("emovec", "merge_emovec"):
            return gpt_run(m, name, x, config)
        if name == "forward_latents":
            stop_t, start_m, stop_m = m.stop_text_token, m.start_mel_token, m.stop_mel_token
            cond = x["cond_latents"] + x["emo_vec"].unsqueeze(1)
            conds = torch.cat([cond, cond.new_zeros(cond.shape[0], 2, cond.shape[2])], 1)  # inference_speech
            pos = torch.arange(x["text"].shape[1])
            text = torch.where(pos < x["text_lengths"].unsqueeze(1), x["text"], torch.full_like(x["text"], stop_t))
            ids, embeds, mask = m.prepare_gpt_inputs(conds, text, x["lang"])
            # the codes as forward() frames them: set_mel_padding, start_mel before, stop_mel after
            pos = torch.arange(x["codes"].shape[1])
            codes = torch.where(pos < x["code_lengths"].unsqueeze(1), x["codes"], torch.full_like(x["codes"], stop_m))
            codes = torch.cat([codes, torch.full_like(codes[:, :1], stop_m)], 1)  # ids already ends with start_mel
            seen = {}
            hook = m.final_norm.register_forward_hook(lambda mod, i, o: seen.setdefault("final_norm", o))
            try:
                m.inference_model.store_mel_emb(embeds)
                out = m.inference_model(input_ids=torch.cat([ids, codes], 1),
                                        attention_mask=torch.cat([mask, torch.ones_like(codes)], 1),
                                        use_cache=False, return_dict=True)
            finally:
                hook.remove()
                m.inference_model.store_mel_emb(None)
            s = embeds.shape[1]
            assert int(ids[0, -1]) == start_m
            return {"latents": seen["final_norm"][:, s:-2], "mel_logits": out.logits[:, s:]}
    raise ConvertError(f"gpt (IndexTTS-2.5): no upstream call for reference entry {name!r}")


def imports_2_5() -> None:
    need_config_reader()
    indextts25("gpt.model_v2")
    indextts25("utils.checkpoint")


def load_2_5(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    return gpt_2_5_model(src_file, config_section(cfg_file, "gpt")), \
        "indextts25 UnifiedVoice(**cfg.gpt) + indextts25 utils.checkpoint.load_checkpoint + post_init_gpt2_config()"
