"""Synthetic IndexTTS-2 inputs in the real release layout, with random values.

Names, shapes and dtypes come from the real upstream classes, built on the meta
device (no memory, no init) at the released configs:

- ``config.yaml``: IndexTTS-2's released config (its ``gpt`` and ``s2mel`` sections)
- ``gpt.pth``: ``UnifiedVoice(**cfg.gpt)`` state dict, saved plain as the release does
- ``s2mel.pth``: training checkpoint ``{"net": {cfm, length_regulator, gpt_layer},
  "optimizer": ..., "scheduler": ..., "epoch", "iters"}`` with Adam-like state
  (``exp_avg``, ``exp_avg_sq`` per parameter), so it has the release's ~1.2 GB
- ``w2v-bert-2.0/{model.safetensors, config.json}``: ``Wav2Vec2BertModel`` with
  transformers' default ``Wav2Vec2BertConfig`` (= w2v-bert-2.0: 24 layers, hidden 1024)
- ``wav2vec2bert_stats.pt``: ``{"mean", "var"}``
- ``bigvgan/{bigvgan_generator.pt, config.json}``: ``{"generator": sd}`` with
  ``weight_g``/``weight_v``, at ``bigvgan_v2_22khz_80band_256x``'s config
- the small models ``convert.py all`` also converts (``feat1.pt``, ``feat2.pt``, the
  MaskGCT semantic codec) by the demo builders of ``tests/upstream``, sized by the
  release config's sections (the matrices' grouping and widths, the codec); CAMPPlus at
  the size infer_v2 hard-codes (``CAMPPlus(feat_dim=80, embedding_size=192)``, 28 MB),
  and ``bpe.model`` the demo's 20-piece SentencePiece model (a stand-in for the real
  12,000 pieces), so that the bundle synthesises end to end

``size="tiny"`` uses the tiny configs of ``tests/upstream`` instead (for the smoke test).

``size="full-2.5"`` writes an IndexTTS-2.5 release at full size instead, in the layout
after upstream's first run (see :func:`release_files`), from IndexTTS-2.5's
reconstructed config (``released_configs.json`` ``indextts2_5``, as hostile as the
published one: ``version: 2.0``, absolute checkpoint paths on the authors' cluster):

- ``gpt.pth``: ``indextts25``'s ``UnifiedVoice(**cfg.gpt)`` with upstream's ``text_head``
  added before ``mel_head`` (as ``tests/upstream/gpt25.py`` builds the oracle), flat fp32:
  456 tensors, 814.85M parameters
- ``s2mel.pth``: ``{"net": {cfm, length_regulator, gpt_layer}}``, no training state
- ``codec.pth``: ``{"model": EnhancedCodec state dict (243 tensors, 50.58M parameters),
  "optimizer": Adam-like moments of every parameter (~405 MB), "scheduler", "step"}``
- ``multilingual_zh_ja_yue_char_del.tiktoken``: a small generated stand-in (the demo's
  byte-level ranks, 2.6 KB), not the real 60,509-token file; it is copied, never parsed
- ``feat1.pt`` [73, 192], ``feat2.pt`` [73, 1280], ``wav2vec2bert_stats.pt``
- ``hf_cache/``: ``w2v-bert-2.0/`` and ``bigvgan/`` at full size as above (plus
  ``preprocessor_config.json``), ``campplus_cn_common.bin`` at the real size
  (``CAMPPlus(feat_dim=80, embedding_size=192)``, 28 MB).  Left out: the MaskGCT codec
  file upstream's first run also fetches (2.5 never loads it, nor does the converter)
  and ``qwen0.6bemo4-merge/`` (as in the 2.0 bench: the bundle records it absent).

A folder is reused when its ``.complete`` stamp matches; files are written under
temporary names and renamed, so an interrupted run leaves no half file behind.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import shutil
import time
import warnings

import torch
import yaml

# The released configs (IndexTTS-2's config.yaml sections, the BigVGAN generator's
# config.json keys), kept in the repository so the bench and tests need nothing beside it.
RELEASED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "released_configs.json")


def released(name: str) -> dict:
    """``"indextts2"``, ``"indextts2_5"`` (config.yaml) or ``"bigvgan_v2_22khz_80band_256x"``
    (config.json); without the ``_about`` notes."""
    with open(RELEASED) as f:
        return {k: v for k, v in json.load(f)[name].items() if not k.startswith("_")}


STAMP = ".complete"
VERSION = 4  # bump when the layout changes, so old caches are regenerated
S2MEL_PARTS = ("cfm", "length_regulator", "gpt_layer")
# The release's small models, which `convert.py all` also converts: written by their
# tiny demo builders (tests/upstream/<name>.py), not at full size.
SMALL_MODELS = ("speaker_matrix", "emotion_matrix", "semantic_codec")
SIZES = ("full", "tiny", "full-2.5")


def version(size: str) -> str:
    """The IndexTTS release a size writes: ``"2.5"`` for ``full-2.5``, else ``"2.0"``."""
    return "2.5" if size == "full-2.5" else "2.0"


def configs(size: str) -> dict:
    """{"yaml": config.yaml document, "w2v": Wav2Vec2BertConfig kwargs, "bigvgan": config.json}"""
    if size == "full":
        return {"yaml": released("indextts2"), "w2v": {}, "bigvgan": released("bigvgan_v2_22khz_80band_256x"),
                "campplus": "real"}
    if size == "full-2.5":
        return {"yaml": released("indextts2_5"), "w2v": {}, "bigvgan": released("bigvgan_v2_22khz_80band_256x")}
    if size == "tiny":
        from tests.upstream import bigvgan as ub, gpt as ug, s2mel as us, w2v_bert as uw

        # the demo's mel and vocoder settings, so the tiny files agree with each other (check's cross-file rules)
        s2 = copy.deepcopy(us.TINY)
        s2["preprocess_params"]["spect_params"] = dict(us.DEMO_SPECT)
        return {"yaml": {"gpt": ug.config(), "s2mel": s2, **ub.demo_config()}, "w2v": dict(uw.TINY), "bigvgan": dict(ub.DEMO)}
    raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


def _meta(build):
    with _quiet(), torch.device("meta"):
        return build()


def modules(cfg: dict, release: str = "2.0") -> dict:
    """The upstream modules on the meta device: {"gpt", "s2mel": {part: module}, "w2v",
    "bigvgan"}; for ``release="2.5"`` the gpt is indextts25's UnifiedVoice with a
    ``text_head`` (see :func:`gpt_state_dict`) and "codec" is codec.pth's ``model``
    state dict (meta tensors, release order)."""
    from tests.upstream import indextts

    doc = cfg["yaml"]
    if release == "2.5":
        from tests.upstream import gpt25, semantic_codec25

        gpt = _meta(lambda: gpt25.add_text_head(gpt25.module().UnifiedVoice(**doc["gpt"]), doc["gpt"]))
    else:
        gpt = _meta(lambda: indextts("gpt.model_v2").UnifiedVoice(**doc["gpt"]))
    commons = indextts("s2mel.modules.commons")
    s2 = _meta(lambda: commons.MyModel(commons.recursive_munch(copy.deepcopy(doc["s2mel"])), use_gpt_latent=True))
    AttrDict = indextts("s2mel.modules.bigvgan.env").AttrDict
    bv = _meta(lambda: indextts("s2mel.modules.bigvgan.bigvgan").BigVGAN(AttrDict(dict(cfg["bigvgan"]))))
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    hc = Wav2Vec2BertConfig(**cfg["w2v"])
    w2v = _meta(lambda: Wav2Vec2BertModel(hc))
    mods = {"gpt": gpt, "s2mel": {k: s2.models[k] for k in S2MEL_PARTS}, "w2v": w2v, "w2v_config": hc, "bigvgan": bv,
            "release": release}
    if release == "2.5":
        with _quiet():
            mods["codec"] = semantic_codec25.meta_state_dict(doc["semantic_codec"])
    return mods


def gpt_state_dict(mods: dict) -> dict:
    """gpt.pth's state dict (meta tensors): the module's; 2.5's with ``text_head`` before
    ``mel_head``, where the release stores it."""
    if mods.get("release") == "2.5":
        from tests.upstream import gpt25

        return gpt25.release_state_dict(mods["gpt"])
    return mods["gpt"].state_dict()


def materialise(sd: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values with the state dict's names, shapes and dtypes.  Buffers that
    already hold real values (built on the CPU) keep them; weight-norm ``g`` is
    positive; integer buffers are zero."""
    out = {}
    for name, t in sd.items():
        if t.device.type != "meta":
            out[name] = t.detach().clone()
        elif t.is_floating_point():
            x = torch.empty(t.shape, dtype=t.dtype)
            x.normal_(0.0, 0.02, generator=gen)
            if name.endswith(("weight_g", "original0")):
                x.abs_().add_(0.5)
            out[name] = x
        else:
            out[name] = torch.zeros(t.shape, dtype=t.dtype)
    return out


def _save_atomic(path: str, write) -> None:
    tmp = path + ".part"
    write(tmp)
    os.replace(tmp, path)


def _torch_save(obj, path: str) -> None:
    _save_atomic(path, lambda p: torch.save(obj, p))


def release_files(folder: str, size: str = "full") -> dict[str, str]:
    """Every input file of the release folder (what `convert.py all` reads), by role."""
    if version(size) == "2.5":
        cache = os.path.join(folder, "hf_cache")
        return {
            "config": os.path.join(folder, "config.yaml"),
            "gpt": os.path.join(folder, "gpt.pth"),
            "s2mel": os.path.join(folder, "s2mel.pth"),
            "codec": os.path.join(folder, "codec.pth"),
            "tokenizer": os.path.join(folder, "multilingual_zh_ja_yue_char_del.tiktoken"),
            "speaker-matrix": os.path.join(folder, "feat1.pt"),
            "emotion-matrix": os.path.join(folder, "feat2.pt"),
            "stats": os.path.join(folder, "wav2vec2bert_stats.pt"),
            "w2v-bert": os.path.join(cache, "w2v-bert-2.0", "model.safetensors"),
            "w2v-bert-config": os.path.join(cache, "w2v-bert-2.0", "config.json"),
            "bigvgan": os.path.join(cache, "bigvgan", "bigvgan_generator.pt"),
            "bigvgan-config": os.path.join(cache, "bigvgan", "config.json"),
            "campplus": os.path.join(cache, "campplus_cn_common.bin"),
        }
    return {
        "config": os.path.join(folder, "config.yaml"),
        "gpt": os.path.join(folder, "gpt.pth"),
        "s2mel": os.path.join(folder, "s2mel.pth"),
        "w2v-bert": os.path.join(folder, "w2v-bert-2.0", "model.safetensors"),
        "w2v-bert-config": os.path.join(folder, "w2v-bert-2.0", "config.json"),
        "stats": os.path.join(folder, "wav2vec2bert_stats.pt"),
        "bigvgan": os.path.join(folder, "bigvgan", "bigvgan_generator.pt"),
        "bigvgan-config": os.path.join(folder, "bigvgan", "config.json"),
        "campplus": os.path.join(folder, "campplus", "campplus_cn_common.bin"),
        "tokenizer": os.path.join(folder, "bpe.model"),
    }


# The 2.0 bench release's tokenizer: the demo's SentencePiece model (20 pieces), a small
# stand-in for the real 12,000-piece bpe.model, so that the bundle can synthesise.
DEMO_BPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "release", "bpe.model")


def all_inputs(folder: str) -> list[str]:
    """Every file of the release folder (what copying "all the inputs" copies)."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f != STAMP and not f.startswith("."))


def ensure(folder: str, size: str = "full", log=print) -> str:
    """Generate the release folder unless a complete one is already there."""
    stamp = os.path.join(folder, STAMP)
    want = json.dumps({"version": VERSION, "size": size})
    files = release_files(folder, size)
    if os.path.isfile(stamp) and open(stamp).read() == want and all(map(os.path.isfile, files.values())):
        log(f"inputs: reusing {folder}")
        return folder
    t0 = time.time()
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(stamp):
        os.unlink(stamp)
    cfg = configs(size)
    if version(size) == "2.5":
        # The Conformers' pos_bias_u/v and w2v-bert's masked_spec_embed are made on the CPU
        # by their constructors (from the global RNG), not on the meta device: seeded here,
        # so the 2.5 files are reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2026)
            mods = modules(cfg, "2.5")
    else:
        mods = modules(cfg)
    gen = torch.Generator().manual_seed(2026)
    (_write_2_5 if version(size) == "2.5" else _write_2_0)(folder, cfg, mods, gen, files, log)
    with open(stamp, "w") as f:
        f.write(want)
    total = sum(os.path.getsize(p) for p in all_inputs(folder))
    log(f"inputs: wrote {folder} ({total / 2**30:.2f} GiB) in {time.time() - t0:.0f} s")
    return folder


def _adam(shapes, gen: torch.Generator, step: float = 1000.0, lr: float = 1e-4, betas=(0.9, 0.98)) -> dict:
    """An Adam optimizer's state_dict for parameters of these shapes: ``step``,
    ``exp_avg`` and ``exp_avg_sq`` per parameter, one param group."""
    shapes = list(shapes)
    return {
        "state": {i: {"step": torch.tensor(step),
                      "exp_avg": torch.empty(s).normal_(0, 1e-4, generator=gen),
                      "exp_avg_sq": torch.empty(s).uniform_(0, 1e-6, generator=gen)}
                  for i, s in enumerate(shapes)},
        "param_groups": [{"lr": lr, "betas": betas, "eps": 1e-9, "weight_decay": 0.0, "params": list(range(len(shapes)))}],
    }


def _write_config(path: str, doc: dict, what: str) -> None:
    with open(path, "w") as f:
        f.write(f"# Synthetic bench release{what}: random weights, real names and shapes (bench/inputs.py).\n")
        yaml.safe_dump(doc, f, sort_keys=False)


def _write_w2v(mods: dict, gen: torch.Generator, files: dict, log) -> None:
    """files["w2v-bert"] and its config.json, then files["stats"]."""
    log(f"inputs: {os.path.relpath(files['w2v-bert'], os.path.dirname(files['config']))}")
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(files["w2v-bert"]), exist_ok=True)
    sd = materialise(mods["w2v"].state_dict(), gen)
    _save_atomic(files["w2v-bert"], lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, p, metadata={"format": "pt"}))
    del sd
    mods["w2v_config"].to_json_file(files["w2v-bert-config"])
    hidden = mods["w2v_config"].hidden_size
    _torch_save({"mean": torch.randn(hidden, generator=gen), "var": torch.rand(hidden, generator=gen) + 0.05}, files["stats"])


def _write_bigvgan(folder: str, cfg: dict, mods: dict, gen: torch.Generator, files: dict, log) -> None:
    log(f"inputs: {os.path.relpath(files['bigvgan'], folder)}")
    os.makedirs(os.path.dirname(files["bigvgan"]), exist_ok=True)
    _torch_save({"generator": materialise(mods["bigvgan"].state_dict(), gen)}, files["bigvgan"])
    shutil.copyfile(_write_json(folder, cfg["bigvgan"]), files["bigvgan-config"])


def _write_2_0(folder: str, cfg: dict, mods: dict, gen: torch.Generator, files: dict, log) -> None:
    small = [importlib.import_module(f"tests.upstream.{m}") for m in SMALL_MODELS]
    doc = dict(cfg["yaml"])
    for m in small:  # sections the release config has (the codec's, emo_num) keep the release's values
        for k, v in m.demo_config().items():
            doc.setdefault(k, v)
    _write_config(files["config"], doc, "")
    for m in small:  # the small models at demo size (together well under 1% of the bytes at full size)
        m.write_demo(folder, doc)
    from tests.upstream import campplus

    shutil.rmtree(os.path.dirname(files["campplus"]), ignore_errors=True)  # no campplus.json of another size left beside it
    if cfg.get("campplus") == "real":  # at the size infer_v2 hard-codes: the pipeline runs it on 80-bin fbanks
        log("inputs: campplus/campplus_cn_common.bin")
        campplus.save_release(campplus.build(campplus.REAL, seed=2026), os.path.dirname(files["campplus"]))
    else:
        campplus.write_demo(folder, doc)
    shutil.copyfile(DEMO_BPE, files["tokenizer"])

    log("inputs: gpt.pth")
    sd = materialise(mods["gpt"].state_dict(), gen)
    _torch_save(sd, files["gpt"])
    del sd

    log("inputs: s2mel.pth")
    net = {k: materialise(m.state_dict(), gen) for k, m in mods["s2mel"].items()}
    # one Adam per sub-model, as upstream's training keeps them
    optimizer = {k: _adam([p.shape for p in m.parameters()], gen) for k, m in mods["s2mel"].items()}
    _torch_save({"net": net, "optimizer": optimizer, "scheduler": {"last_epoch": 1000, "base_lrs": [1e-4]},
                 "epoch": 10, "iters": 1000}, files["s2mel"])
    del net, optimizer

    _write_w2v(mods, gen, files, log)
    _write_bigvgan(folder, cfg, mods, gen, files, log)


def _write_2_5(folder: str, cfg: dict, mods: dict, gen: torch.Generator, files: dict, log) -> None:
    from tests.upstream import campplus, emotion_matrix, speaker_matrix, tokenizer, w2v_bert

    doc = cfg["yaml"]
    _write_config(files["config"], doc, " (IndexTTS-2.5, config reconstructed)")
    tokenizer.write_tiktoken(folder)  # a small stand-in: the bundle copies it, nothing parses it
    speaker_matrix.write_demo(folder, doc)  # [sum(emo_num), s2mel.style_encoder.dim]
    emotion_matrix.write_demo(folder, doc)  # [sum(emo_num), gpt.model_dim]

    log("inputs: gpt.pth")
    sd = materialise(gpt_state_dict(mods), gen)
    _torch_save(sd, files["gpt"])
    del sd

    log("inputs: s2mel.pth")  # parameters only: {"net": ...}, no training state beside it
    _torch_save({"net": {k: materialise(m.state_dict(), gen) for k, m in mods["s2mel"].items()}}, files["s2mel"])

    log("inputs: codec.pth")  # {"model": ...} beside the training state (Adam moments of every parameter)
    model = materialise(mods["codec"], gen)
    _torch_save({"model": model, "optimizer": _adam([v.shape for v in model.values()], gen, step=5000.0, lr=2e-4,
                                                    betas=(0.8, 0.99)),
                 "scheduler": {"last_epoch": 5000, "base_lrs": [2e-4]}, "step": 5000}, files["codec"])
    del model

    # hf_cache/, as upstream's first run fills it
    _write_w2v(mods, gen, files, log)
    w2v_bert.save_preprocessor(os.path.dirname(files["w2v-bert"]))
    log("inputs: hf_cache/campplus_cn_common.bin")
    campplus.save_release(campplus.build(campplus.REAL, seed=2026), os.path.dirname(files["campplus"]))
    _write_bigvgan(folder, cfg, mods, gen, files, log)


def _write_json(folder: str, obj: dict) -> str:
    path = os.path.join(folder, ".bigvgan_config.json")
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path
