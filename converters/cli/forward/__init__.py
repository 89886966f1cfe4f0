"""``convert.py verify --forward``: the reference runtime on the canonical file against
upstream's own module built from the source, on the same inputs.

``verify`` alone proves the canonical bytes equal a recomputation from the recorded
provenance; it cannot tell whether the provenance gave each tensor the right role (a
table that swapped q and k records the swap faithfully).  This runs the model: for each
kind, one function builds the upstream module from the source files with upstream's own
loading code (never the converter's inverse ops), and one maps a reference entry
point's inputs to the upstream call and its outputs back.  Every reference entry point
runs on its own seeded inputs (seed 0, as ``golden``) on both sides.

Upstream code (``indextts2-inference``, ``transformers`` and what they import) is not a
runtime dependency of the converter: it is imported lazily here, and where it is
missing :class:`UpstreamMissing` says which package, and that the forward comparison
was not run.  ``indextts``'s package ``__init__`` imports the whole inference stack
(librosa, torchaudio, ...), so :func:`indextts` imports only the model modules.

Tolerance.  Both sides compute in float32, in a different order (fused vs split
projections, weight norm applied at run time vs folded), which the tests measure at a
few float32 eps of the output scale (at most 7 eps on the demo); the role swaps tried
on the demo change an output by 0.5% to 80% of it.  An output passes within ``1e-4 *
max(1, max|upstream output|)`` (BigVGAN's clamped waveform on the scale of the
``conv_post`` output it clamps, which is compared too).  A float16 or bfloat16 file stores its
'float'-class tensors rounded to that dtype (the dtype policy keeps norms, statistics,
positional and frequency tables and snake parameters float32), so upstream's loaded
values are rounded to it too, all of them: a slightly coarser emulation than the file,
which the tolerance covers (they stay float32, computed in float32); what still differs is where rounding meets the folds done at conversion
(weight norm, batch norm, exponentiated snake parameters): the file rounds the folded
product, upstream folds rounded factors at run time.  That is measured at under 3 eps
of the output scale (the demo, in both dtypes, and a full-size CAMPPlus), so those
files pass within ``max(1e-4, 8 * eps) * max(1, max|upstream output|)``: 0.0078 for
float16, 0.0625 for bfloat16 (coarser: a swap whose effect is smaller shows only on a
float32 conversion).  Integer outputs (codes, indices) must be equal.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import sys
import types
import warnings
from dataclasses import dataclass

from ...errors import ConvertError

# Upstream package of each top-level module name an import may miss.
PACKAGES = {"indextts": "indextts2-inference", "indextts25": "indextts25-inference", "yaml": "PyYAML"}
INSTALL = ("install the test dependencies: pip install -r requirements-dev.txt and "
           "pip install --no-deps indextts2-inference==2.1.1 indextts25-inference==0.2.0 (make test does both)")

FP32_RTOL = 1e-4
HALF_EPS_FACTOR = 8  # measured (demo in float16 and bfloat16, full-size CAMPPlus): at most 2.8 eps


class UpstreamMissing(ConvertError):
    """Upstream code cannot be imported: the forward comparison cannot run."""


def _missing(what: str, e: ImportError) -> UpstreamMissing:
    name = (e.name or "").split(".")[0]
    if name in ("indextts", "indextts25") and e.name != name and name in sys.modules:
        pkg, tested = ("indextts2-inference", "2.1.1") if name == "indextts" else ("indextts25-inference", "0.2.0")
        head = f"the installed {pkg} has no module {e.name} (the version tested is {tested})"
    elif name:
        pkg = PACKAGES.get(name, name)
        head = f"package {pkg} is missing" + (f" (module {e.name})" if e.name != name else "")
    else:
        head = f"import failed: {e}"
    return UpstreamMissing(f"the forward comparison was not run: upstream {what} cannot be imported: {head}; {INSTALL}")


@contextlib.contextmanager
def _importing(what: str):
    try:
        yield
    except ImportError as e:
        raise _missing(what, e) from None


def indextts(module: str, package: str = "indextts"):
    """Import ``indextts.<module>`` without running ``indextts/__init__.py`` (which
    imports the whole inference stack): an empty package object with the installed
    folder as its path stands in for it.  ``package="indextts25"``: the same for
    IndexTTS-2.5's ``indextts25-inference`` (its ``__init__`` imports the inference API)."""
    with _importing(f"{package}.{module}"):
        if package not in sys.modules:
            try:
                spec = importlib.util.find_spec(package)
            except ImportError:
                spec = None
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError(f"No module named {package!r}", name=package)
            pkg = types.ModuleType(package)
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules[package] = pkg
        return importlib.import_module(f"{package}.{module}")


def indextts25(module: str):
    """``indextts25.<module>`` (the PyPI package indextts25-inference, IndexTTS-2.5's
    trimmed model code: its GPT has no text_head, its codec only the decoding half),
    without its ``__init__``.  Its GPT module imports tiktoken (the tokenizer module
    holds the language table)."""
    return indextts(module, "indextts25")


def _need(module: str, what: str):
    """Import a third-party module upstream needs, or say which package is missing."""
    with _importing(what):
        return importlib.import_module(module)


_TORCHAUDIO = ("torchaudio", "torchaudio.functional", "torchaudio.functional.functional")


def _torchaudio_refused(*args, **kwargs):
    raise RuntimeError("torchaudio stub (converters/cli/forward/): the mel helpers are not available")


def repcodec_module():
    """``repcodec_model`` (the class ``build_semantic_codec`` instantiates).  Its
    ``kmeans/vocos.py`` does ``from torchaudio.functional.functional import _hz_to_mel,
    _mel_to_hz``, used only by vocos.py's mel/MDCT front ends, never by anything RepCodec
    builds; torchaudio is tied to one torch build, so a stub stands in for it during
    this one import (then is removed, so no one else is fooled).  The stub's helpers
    raise if called."""
    name = "indextts.utils.maskgct.models.codec.kmeans.repcodec_model"
    if name in sys.modules:
        return sys.modules[name]
    mods = {k: types.ModuleType(k) for k in _TORCHAUDIO}
    mods["torchaudio"].functional = mods["torchaudio.functional"]
    mods["torchaudio.functional"].functional = mods["torchaudio.functional.functional"]
    mods["torchaudio.functional.functional"]._hz_to_mel = _torchaudio_refused
    mods["torchaudio.functional.functional"]._mel_to_hz = _torchaudio_refused
    with stand_ins(mods):
        return indextts("utils.maskgct.models.codec.kmeans.repcodec_model")


@contextlib.contextmanager
def stand_ins(mods: dict, also: tuple[str, ...] = ()):
    """``mods`` in ``sys.modules`` only for the duration; afterwards those names (and the
    ``also`` names) are as they were before, present or absent."""
    saved = {k: sys.modules.get(k) for k in (*mods, *also)}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@contextlib.contextmanager
def _quiet():
    """Upstream's deprecation warnings (weight_norm) and transformers' load messages."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf = sys.modules.get("transformers")
        level = tf.logging.get_verbosity() if tf else None
        bars = tf.utils.logging.is_progress_bar_enabled() if tf else None
        if tf:
            tf.logging.set_verbosity_error()
            tf.utils.logging.disable_progress_bar()
        try:
            yield
        finally:
            if tf:
                tf.logging.set_verbosity(level)
                if bars:
                    tf.utils.logging.enable_progress_bar()


def _is_safetensors(path: str) -> bool:
    return path.endswith(".safetensors")


def _safetensors_state(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _omegaconf(cfg):
    """A config section as infer_v2 hands it to upstream (``OmegaConf.load(...)``)."""
    OmegaConf = _need("omegaconf", "config (omegaconf)").OmegaConf
    return cfg if not isinstance(cfg, dict) else OmegaConf.create(cfg)


def config_section(path: str, key: str):
    """``OmegaConf.load(path)[key]``, as infer_v2 reads its config.yaml."""
    OmegaConf = _need("omegaconf", "config (omegaconf)").OmegaConf
    cfg = OmegaConf.load(path)
    if key not in cfg:
        raise ConvertError(f"{path}: no {key}: section")
    return cfg[key]


# ------------------------------------------------------------------ gpt


def gpt_model(path: str, cfg):
    """infer_v2: ``UnifiedVoice(**cfg.gpt)`` and ``utils.checkpoint.load_checkpoint``
    (``torch.load`` + strict ``load_state_dict``).  A safetensors dump of the same state
    dict, which upstream's loader cannot read, is read with safetensors and loaded the
    same strict way."""
    import torch

    mv = indextts("gpt.model_v2")
    ckpt = indextts("utils.checkpoint")
    with _quiet():
        m = mv.UnifiedVoice(**cfg)
    if _is_safetensors(path):
        m.load_state_dict(_safetensors_state(path), strict=True)
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


# ------------------------------------------------------------------ gpt, IndexTTS-2.5


def gpt_2_5_model(path: str, cfg):
    """infer_v2_5: ``UnifiedVoice(**cfg.gpt, spk_cond_mode="campplus")`` and
    ``load_checkpoint``; here indextts25-inference's ``UnifiedVoice(**cfg.gpt)`` and its
    ``utils.checkpoint.load_checkpoint`` (which ignores ``text_head``, a key its GPT does
    not have, and refuses a missing key), then ``post_init_gpt2_config()`` (the
    ``GPT2InferenceModel`` that ``generate`` runs).  A safetensors dump is loaded the
    same way (non-strict for the unexpected, missing keys refused)."""
    import torch

    mv = indextts25("gpt.model_v2")
    ckpt = indextts25("utils.checkpoint")
    with _quiet():
        m = mv.UnifiedVoice(**cfg)
    if _is_safetensors(path):
        missing = m.load_state_dict(_safetensors_state(path), strict=False).missing_keys
        if missing:
            raise ConvertError(f"{path}: missing {len(missing)} keys upstream needs, e.g. {missing[:5]}")
    else:
        ckpt.load_checkpoint(m, str(path))
    m = m.eval().to(torch.float32)
    with _quiet():
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


# ------------------------------------------------------------------ s2mel

S2MEL_SUBMODULES = ("cfm", "length_regulator", "gpt_layer")


def s2mel_model(path: str, cfg):
    """infer_v2: ``MyModel(cfg.s2mel, use_gpt_latent=True)``, ``load_checkpoint2`` (the
    ``net`` sub-dicts, DDP prefix stripped, loaded non-strictly), the estimator's caches,
    eval.  load_checkpoint2 drops what it cannot load silently; a parameter it left at
    its random init is refused here.  A flat safetensors dump (``cfm.…``,
    ``length_regulator.…``, ``gpt_layer.…``), which upstream cannot read, is split by
    sub-model and loaded strictly."""
    import torch

    c = indextts("s2mel.modules.commons")
    with _quiet():
        m = c.MyModel(_omegaconf(cfg), use_gpt_latent=True)
    if _is_safetensors(path):
        flat = _safetensors_state(path)
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
            with _quiet():
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


# ------------------------------------------------------------------ w2v-bert


@functools.cache
def upstream_get_emb():
    """``IndexTTS2.get_emb`` compiled from upstream's infer_v2.py source (importing that
    module would pull in the whole inference stack)."""
    indextts("utils")  # registers the installed package (without its __init__)
    path = os.path.join(sys.modules["indextts"].__path__[0], "infer_v2.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "IndexTTS2")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "get_emb")
    import torch

    ns = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns["get_emb"]


def w2v_bert_model(model_dir: str, stats_path: str):
    """``maskgct_utils.build_semantic_model(stats_path)`` with its hard-coded hub name
    ("facebook/w2v-bert-2.0") pointed at the local folder: ``from_pretrained``, eval, and
    ``mean`` / ``sqrt(var)`` from the .pt file.  Returns what ``get_emb`` reads."""
    tf = _need("transformers", "w2v-bert (transformers)")
    repcodec_module()  # maskgct_utils imports repcodec_model
    mu = indextts("utils.maskgct_utils")

    class FromFolder:
        @staticmethod
        def from_pretrained(name):
            if name != "facebook/w2v-bert-2.0":
                raise ConvertError(f"upstream build_semantic_model asked for {name!r}, not facebook/w2v-bert-2.0")
            return tf.Wav2Vec2BertModel.from_pretrained(str(model_dir))

    saved = mu.Wav2Vec2BertModel
    mu.Wav2Vec2BertModel = FromFolder
    try:
        with _quiet():
            model, mean, std = mu.build_semantic_model(str(stats_path))
    finally:
        mu.Wav2Vec2BertModel = saved
    return types.SimpleNamespace(semantic_model=model.float(), semantic_mean=mean.float(), semantic_std=std.float())


def w2v_bert_hidden_states(tts, x, mask):
    import torch

    with torch.no_grad():
        out = tts.semantic_model(input_features=x, attention_mask=mask, output_hidden_states=True)
    return torch.stack(out.hidden_states)


def w2v_bert_run(tts, name: str, x: dict, config=None) -> dict:
    """``hidden_states``: transformers' stacked hidden states; for a file of profile
    ``indextts2`` (17 layers, the statistics folded into the last) the reference's last
    state is the normalised feature, so upstream's first 17 states and ``get_emb``."""
    import torch

    feats, mask = x["input_features"], x["attention_mask"]
    with torch.no_grad():
        if name == "semantic_features":
            return {"semantic_features": upstream_get_emb()(tts, feats, mask)}
        if name == "hidden_states":
            hs = w2v_bert_hidden_states(tts, feats, mask)
            if config is not None and config.get("profile") == "indextts2":
                k = config["indextts2_hidden_state_index"]
                hs = torch.cat([hs[:k], upstream_get_emb()(tts, feats, mask).unsqueeze(0)])
            return {"hidden_states": hs}
    raise ConvertError(f"w2v-bert: no upstream call for reference entry {name!r}")


# ------------------------------------------------------------------ bigvgan


def bigvgan_model(path: str, config_json: str):
    """infer_v2: ``BigVGAN.from_pretrained(folder)`` (config.json and
    ``bigvgan_generator.pt`` of the folder), ``remove_weight_norm()``, eval.  Another file
    or config (a safetensors dump, --config) is loaded as from_pretrained's body does:
    ``BigVGAN(load_hparams_from_json(config))`` and ``load_state_dict``."""
    import torch

    bv = indextts("s2mel.modules.bigvgan.bigvgan")
    folder = os.path.dirname(os.path.abspath(path))
    with _quiet():
        if os.path.basename(path) == "bigvgan_generator.pt" and os.path.abspath(config_json) == os.path.join(folder, "config.json"):
            m = bv.BigVGAN.from_pretrained(folder, use_cuda_kernel=False)
        else:
            m = bv.BigVGAN(bv.load_hparams_from_json(config_json), use_cuda_kernel=False)
            sd = _safetensors_state(path) if _is_safetensors(path) else torch.load(path, map_location="cpu")["generator"]
            m.load_state_dict(sd)
        m.remove_weight_norm()
    return m.eval().to(torch.float32)


def bigvgan_run(m, name: str, x: dict, config=None) -> dict:
    """The waveform, and ``conv_post``'s output before the clamp (the reference records
    it as an activation): a waveform clamped to +-1 almost everywhere shows little."""
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


# ------------------------------------------------------------------ semantic codec


def semantic_codec_model(path: str, cfg):
    """infer_v2: ``build_semantic_codec(cfg.semantic_codec)`` and
    ``safetensors.torch.load_model`` (strict), eval; weight norm left in place."""
    import torch

    st = _need("safetensors.torch", "semantic codec (safetensors)")
    repcodec_module()
    build = indextts("utils.maskgct_utils").build_semantic_codec
    with _quiet():
        codec = build(_omegaconf(cfg))
    st.load_model(codec, str(path))
    return codec.eval().to(torch.float32)


def semantic_codec_run(codec, name: str, x: dict, config=None) -> dict:
    """``quantize``: ``RepCodec.quantize(x)``; ``vq2emb``: infer_v2's
    ``quantizer.vq2emb(codes.unsqueeze(1))`` on codes ``[1, T]``."""
    import torch

    with torch.no_grad():
        if name == "quantize":
            codes, quantized = codec.quantize(x["x"])
            return {"codes": codes, "quantized": quantized}
        if name == "vq2emb":
            return {"emb": codec.quantizer.vq2emb(x["codes"].unsqueeze(1))}
    raise ConvertError(f"semantic-codec: no upstream call for reference entry {name!r}")


# ------------------------------------------------------------------ semantic codec, IndexTTS-2.5

ENHANCED_CODEC_ARGS = ("codebook_size", "hidden_size", "codebook_dim", "vocos_dim", "vocos_intermediate_dim",
                       "vocos_num_layers")


def semantic_codec_2_5_model(path: str, cfg):
    """infer_v2_5: ``EnhancedCodec(**cfg.semantic_codec, cfg=cfg.semantic_codec)`` and its
    ``load_checkpoint(codec.pth)``; here indextts25-inference's decoding-half
    ``EnhancedCodec`` (its six size arguments) and its own ``load_checkpoint`` (the
    ``model`` dict, weight norm folded, missing keys refused).  A safetensors dump of the
    state dict is folded with the package's ``fold_weight_norm`` and loaded the same way."""
    import torch

    cm = indextts25("codec.models")
    args = {k: cfg[k] for k in ENHANCED_CODEC_ARGS if k in cfg}
    if int(cfg.get("num_quantizers", 1)) != 1:
        raise ConvertError("indextts25-inference's EnhancedCodec has one quantizer; this config asks for "
                           f"{cfg.get('num_quantizers')}")
    m = cm.EnhancedCodec(**args)
    if _is_safetensors(path):
        sd = indextts25("utils.checkpoint").fold_weight_norm(_safetensors_state(path), "cpu")
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


# ------------------------------------------------------------------ campplus

INFER_V2_CAMPPLUS = {"feat_dim": 80, "embedding_size": 192}  # infer_v2: CAMPPlus(feat_dim=80, embedding_size=192)


def campplus_model(path: str, args: dict | None = None):
    """infer_v2: ``CAMPPlus(feat_dim=80, embedding_size=192)`` (or the arguments of a
    campplus.json, over those), ``load_state_dict(torch.load(path))`` (strict), eval."""
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


# ------------------------------------------------------------------ speaker / emotion matrices


def matrix_model(path: str, emo_num):
    """infer_v2 ``_load_emotion_matrices``: ``torch.split(torch.load(path), cfg.emo_num)``."""
    import torch

    return torch.split(torch.load(path), list(emo_num))


def speaker_matrix_run(groups, name: str, x: dict, config=None) -> dict:
    """infer_v2: ``[find_most_similar_cosine(style, tmp) for tmp in self.spk_matrix]``."""
    import torch

    if name == "select_rows":
        find = indextts("emotion").find_most_similar_cosine
        return {"index": torch.stack([find(x["style"], tmp) for tmp in groups]).to(torch.int64)}
    raise ConvertError(f"speaker-matrix: no upstream call for reference entry {name!r}")


def emotion_matrix_run(groups, name: str, x: dict, config=None) -> dict:
    """infer_v2's mix for given row indices: ``sum(weights.unsqueeze(1) * cat(tmp[i]), 0)``."""
    import torch

    if name == "mix":
        picked = torch.cat([tmp[int(i)].unsqueeze(0) for i, tmp in zip(x["index"], groups)], 0)
        return {"emovec_mat": torch.sum(x["weights"].unsqueeze(1) * picked, 0).unsqueeze(0)}
    raise ConvertError(f"emotion-matrix: no upstream call for reference entry {name!r}")


# ------------------------------------------------------------------ dispatch


def import_upstream(kind: str, family_version: str = "2.0") -> None:
    """Import the upstream code ``kind`` needs, before anything is read, so that a missing
    package is reported first (:class:`UpstreamMissing`)."""
    _need("torch", "torch")
    if kind in ("gpt", "s2mel", "semantic-codec", "speaker-matrix", "emotion-matrix"):
        _need("omegaconf", "config reader (omegaconf)")  # infer_v2 reads config.yaml with it
    if family_version == "2.5" and kind == "gpt":
        indextts25("gpt.model_v2")
        indextts25("utils.checkpoint")
    elif family_version == "2.5" and kind == "semantic-codec":
        indextts25("codec.models")
        indextts25("utils.checkpoint")
    elif kind == "gpt":
        indextts("gpt.model_v2")
        indextts("utils.checkpoint")
    elif kind == "s2mel":
        indextts("s2mel.modules.commons")
        indextts("s2mel.modules.flow_matching")
        indextts("s2mel.modules.length_regulator")
    elif kind in ("w2v-bert", "semantic-codec"):
        _need("transformers", "w2v-bert (transformers)")
        _need("safetensors.torch", "safetensors")
        repcodec_module()
        indextts("utils.maskgct_utils")
    elif kind == "bigvgan":
        indextts("s2mel.modules.bigvgan.bigvgan")
    elif kind == "campplus":
        indextts("s2mel.modules.campplus.DTDNN")
    elif kind == "speaker-matrix":
        indextts("emotion")
    elif kind != "emotion-matrix":
        raise ConvertError(f"no upstream forward for model {kind!r}")


def build(kind: str, src_file: str, cfg_file: str | None, extra: dict[str, str], family_version: str = "2.0"):
    """The upstream module of ``kind`` from the located source, config and extra files
    (``extra["stats/"]``: the w2v-bert statistics); (module, how it was loaded)."""
    dump = _is_safetensors(src_file)
    if family_version == "2.5" and kind == "gpt":
        return gpt_2_5_model(src_file, config_section(cfg_file, "gpt")), \
            "indextts25 UnifiedVoice(**cfg.gpt) + indextts25 utils.checkpoint.load_checkpoint + post_init_gpt2_config()"
    if family_version == "2.5" and kind == "semantic-codec":
        return semantic_codec_2_5_model(src_file, config_section(cfg_file, "semantic_codec")), \
            "indextts25 EnhancedCodec(**cfg.semantic_codec) + its load_checkpoint (codec.pth 'model', weight norm folded)"
    if kind == "gpt":
        return gpt_model(src_file, config_section(cfg_file, "gpt")), "UnifiedVoice(**cfg.gpt) + " + (
            "strict load_state_dict of the safetensors dump (upstream's load_checkpoint reads torch files only)"
            if dump else "utils.checkpoint.load_checkpoint")
    if kind == "s2mel":
        return s2mel_model(src_file, config_section(cfg_file, "s2mel")), "MyModel(cfg.s2mel, use_gpt_latent=True) + " + (
            "strict load_state_dict per sub-model of the safetensors dump (upstream's load_checkpoint2 reads torch files only)"
            if dump else "load_checkpoint2")
    if kind == "w2v-bert":
        if os.path.basename(src_file) != "model.safetensors":
            raise ConvertError(f"{src_file}: upstream (transformers from_pretrained) reads model.safetensors in a folder")
        if os.path.abspath(cfg_file) != os.path.join(os.path.dirname(os.path.abspath(src_file)), "config.json"):
            raise ConvertError(f"{cfg_file}: upstream (transformers from_pretrained) reads the config.json beside the model")
        if not extra.get("stats/", "").endswith(".pt"):
            raise ConvertError(f"{extra.get('stats/')}: upstream's build_semantic_model reads a torch .pt statistics file")
        return w2v_bert_model(os.path.dirname(os.path.abspath(src_file)), extra["stats/"]), \
            "maskgct_utils.build_semantic_model (Wav2Vec2BertModel.from_pretrained on the folder) + IndexTTS2.get_emb"
    if kind == "bigvgan":
        native = os.path.basename(src_file) == "bigvgan_generator.pt" and \
            os.path.abspath(cfg_file) == os.path.join(os.path.dirname(os.path.abspath(src_file)), "config.json")
        return bigvgan_model(src_file, cfg_file), ("BigVGAN.from_pretrained" if native else
                                                   "BigVGAN(load_hparams_from_json(config)) + load_state_dict, as from_pretrained does") \
            + " + remove_weight_norm()"
    if kind == "semantic-codec":
        return semantic_codec_model(src_file, config_section(cfg_file, "semantic_codec")), \
            "build_semantic_codec(cfg.semantic_codec) + safetensors.torch.load_model"
    if kind == "campplus":
        args = None
        if cfg_file is not None:
            with open(cfg_file) as f:
                args = json.load(f)
        return campplus_model(src_file, args), "CAMPPlus(**args) + load_state_dict(torch.load(...))"
    if kind in ("speaker-matrix", "emotion-matrix"):
        return matrix_model(src_file, config_section(cfg_file, "emo_num")), "torch.split(torch.load(...), cfg.emo_num) (infer_v2)"
    raise ConvertError(f"no upstream forward for model {kind!r}")


RUN = {"gpt": gpt_run, "s2mel": s2mel_run, "w2v-bert": w2v_bert_run, "bigvgan": bigvgan_run,
       "semantic-codec": semantic_codec_run, "campplus": campplus_run,
       "speaker-matrix": speaker_matrix_run, "emotion-matrix": emotion_matrix_run,
       "gpt@2.5": gpt_2_5_run, "semantic-codec@2.5": semantic_codec_2_5_run}


def run(kind: str, m, name: str, inputs: dict, config: dict | None = None, family_version: str = "2.0") -> dict:
    """Upstream's outputs for one reference entry point, by the entry's output names;
    any other key is an activation the reference records under that name."""
    return RUN.get(f"{kind}@{family_version}", RUN[kind])(m, name, inputs, config)


# ------------------------------------------------------------------ the comparison


@dataclass
class Row:
    entry: str
    output: str
    max_abs_diff: float
    max_abs: float
    tolerance: float
    ok: bool
    note: str = ""


def tolerance(dtype_name: str):
    """(relative bound, the half dtype upstream's values are rounded to or None, why)."""
    import torch

    from reference.load import DTYPES

    dt = DTYPES.get(dtype_name, torch.float32)
    if dt in (torch.float16, torch.bfloat16):
        eps = float(torch.finfo(dt).eps)
        rtol = max(FP32_RTOL, HALF_EPS_FACTOR * eps)
        return rtol, dt, (f"{dtype_name} file: upstream's loaded values rounded to {dtype_name} too; tolerance "
                          f"{HALF_EPS_FACTOR} x eps({dtype_name}) = {rtol:.3g} x max(1, max|value|), as weights folded "
                          "at conversion are rounded after the fold, upstream's before")
    return FP32_RTOL, None, f"{dtype_name} file: tolerance {FP32_RTOL:g} x max(1, max|value|)"


def round_to(m, dtype) -> None:
    """Round upstream's loaded values to ``dtype`` in place (they stay float32): every
    floating tensor of a module's state dict, of a namespace's modules and tensors, or
    of a tuple of tensors.  Buffers upstream computes at run time are left alone."""
    import torch

    def rnd(t):
        if t.is_floating_point():
            with torch.no_grad():
                t.copy_(t.to(dtype).to(t.dtype))

    if isinstance(m, torch.nn.Module):
        for t in m.state_dict().values():
            rnd(t)
    elif isinstance(m, torch.Tensor):
        rnd(m)
    elif isinstance(m, (tuple, list)):
        for t in m:
            round_to(t, dtype)
    elif isinstance(m, types.SimpleNamespace):
        for t in vars(m).values():
            round_to(t, dtype)


# Outputs whose tolerance scales with another tensor's magnitude: BigVGAN's waveform is
# clamp(conv_post) (or tanh), 1-Lipschitz, so it differs at most as conv_post does, and
# where conv_post runs far past +-1 its differences near the clamp are on that scale.
SCALE_OF = {("bigvgan", "vocode", "waveform"): "conv_post"}


def compare(got, want, rtol: float, scale: tuple[str, object] | None = None) -> tuple[float, float, float, bool, str]:
    """(max abs diff, max |want|, tolerance, ok, note); the tolerance is ``rtol *
    max(1, max|t|)`` with ``t`` the upstream tensor ``scale = (name, t)``, else ``want``."""
    import torch

    if tuple(got.shape) != tuple(want.shape):
        return float("inf"), float("nan"), 0.0, False, f"shape {list(got.shape)} reference, {list(want.shape)} upstream"
    if not want.is_floating_point():
        diff = 0.0 if torch.equal(got.long(), want.long()) else float((got.long() - want.long()).abs().max())
        n = int((got.long() != want.long()).sum())
        return diff, float(want.abs().max()) if want.numel() else 0.0, 0.0, diff == 0, \
            "integer: must be equal" + (f" ({n} of {want.numel()} differ)" if n else "")
    got, want = got.double(), want.double()
    peak = float(want.abs().max()) if want.numel() else 0.0
    if not torch.isfinite(want).all() or not torch.isfinite(got).all():
        return float("inf"), peak, 0.0, False, "non-finite values"
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    ref = peak if scale is None else float(scale[1].abs().max())
    tol = rtol * max(1.0, ref)
    return diff, peak, tol, diff <= tol, "" if scale is None else f"tolerance on the scale of max|{scale[0]}| = {ref:.3g}"


def verify_forward(src_path: str, out_path: str, extra: dict[str, str] | None = None, config: str | None = None,
                   on_row=lambda r: None, echo=lambda s: None, seed: int = 0) -> list[Row]:
    """Every reference entry point on ``out_path`` against upstream built from
    ``src_path`` (and ``config``, else the one the converter would read)."""
    import torch

    from ...release import engine
    from ...format.family import file_version
    from ..verify import canonical_kind
    from reference.entry import entries
    from reference.load import load

    kind, header = canonical_kind(out_path)
    fv = file_version(header.metadata)
    import_upstream(kind, fv)
    src_file, cfg_file = engine.locate(kind, src_path, config)
    files = engine.input_files(engine.model_module(kind, fv), src_file, extra)
    m, how = build(kind, src_file, cfg_file, files, fv)
    echo(f"upstream: {how}, from {src_file}" + (f" and {cfg_file}" if cfg_file else "")
         + "".join(f" and {p}" for p in files.values()))
    rtol, half, why = tolerance(header.metadata.get("dtype", "F32"))
    if half is not None:
        round_to(m, half)
    echo(f"reference: {out_path} ({why})")
    w = load(out_path, device="cpu").float()
    rows: list[Row] = []
    for e in entries(kind, fv):
        x = e.inputs(w.config, torch.Generator().manual_seed(seed))
        acts: dict = {}
        with torch.no_grad():
            got = e.run(w, acts, **x)
        want = run(kind, m, e.name, x, w.config, fv)
        for o in [*e.outputs, *(k for k in want if k not in e.outputs)]:
            act = o not in e.outputs
            by = SCALE_OF.get((kind, e.name, o))
            diff, peak, tol, ok, note = compare(acts[o] if act else got[o], want[o], rtol,
                                                None if by is None else (by, want[by]))
            row = Row(e.name, o, diff, peak, tol, ok, "; ".join(n for n in ("activation" if act else "", note) if n))
            rows.append(row)
            on_row(row)
    return rows
