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
  MaskGCT semantic codec, CAMPPlus) by the demo builders of ``tests/upstream``, sized by
  the release config where it has a section (the matrices' grouping and widths, the
  codec), else at demo size (CAMPPlus: the release hard-codes it); the targets are about
  the four big files

``size="tiny"`` uses the tiny configs of ``tests/upstream`` instead (for the smoke test).
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
    """``"indextts2"`` (config.yaml) or ``"bigvgan_v2_22khz_80band_256x"`` (config.json)."""
    with open(RELEASED) as f:
        return copy.deepcopy(json.load(f)[name])
STAMP = ".complete"
VERSION = 3  # bump when the layout changes, so old caches are regenerated
S2MEL_PARTS = ("cfm", "length_regulator", "gpt_layer")
# The release's small models, which `convert.py all` also converts: written by their
# tiny demo builders (tests/upstream/<name>.py), not at full size.
SMALL_MODELS = ("speaker_matrix", "emotion_matrix", "semantic_codec", "campplus")


def configs(size: str) -> dict:
    """{"yaml": config.yaml document, "w2v": Wav2Vec2BertConfig kwargs, "bigvgan": config.json}"""
    if size == "full":
        return {"yaml": released("indextts2"), "w2v": {}, "bigvgan": released("bigvgan_v2_22khz_80band_256x")}
    if size == "tiny":
        from tests.upstream import bigvgan as ub, gpt as ug, s2mel as us, w2v_bert as uw

        # the demo's mel and vocoder settings, so the tiny files agree with each other (check's cross-file rules)
        s2 = copy.deepcopy(us.TINY)
        s2["preprocess_params"]["spect_params"] = dict(us.DEMO_SPECT)
        return {"yaml": {"gpt": ug.config(), "s2mel": s2, **ub.demo_config()}, "w2v": dict(uw.TINY), "bigvgan": dict(ub.DEMO)}
    raise ValueError(f"size must be 'full' or 'tiny', not {size!r}")


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


def modules(cfg: dict) -> dict:
    """The upstream modules on the meta device: {"gpt", "s2mel": {part: module}, "w2v", "bigvgan"}."""
    from tests.upstream import indextts

    doc = cfg["yaml"]
    gpt = _meta(lambda: indextts("gpt.model_v2").UnifiedVoice(**doc["gpt"]))
    commons = indextts("s2mel.modules.commons")
    s2 = _meta(lambda: commons.MyModel(commons.recursive_munch(copy.deepcopy(doc["s2mel"])), use_gpt_latent=True))
    AttrDict = indextts("s2mel.modules.bigvgan.env").AttrDict
    bv = _meta(lambda: indextts("s2mel.modules.bigvgan.bigvgan").BigVGAN(AttrDict(dict(cfg["bigvgan"]))))
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    hc = Wav2Vec2BertConfig(**cfg["w2v"])
    w2v = _meta(lambda: Wav2Vec2BertModel(hc))
    return {"gpt": gpt, "s2mel": {k: s2.models[k] for k in S2MEL_PARTS}, "w2v": w2v, "w2v_config": hc, "bigvgan": bv}


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


def release_files(folder: str) -> dict[str, str]:
    """Every input file of the release folder (what `convert.py all` reads), by role."""
    return {
        "config": os.path.join(folder, "config.yaml"),
        "gpt": os.path.join(folder, "gpt.pth"),
        "s2mel": os.path.join(folder, "s2mel.pth"),
        "w2v-bert": os.path.join(folder, "w2v-bert-2.0", "model.safetensors"),
        "w2v-bert-config": os.path.join(folder, "w2v-bert-2.0", "config.json"),
        "stats": os.path.join(folder, "wav2vec2bert_stats.pt"),
        "bigvgan": os.path.join(folder, "bigvgan", "bigvgan_generator.pt"),
        "bigvgan-config": os.path.join(folder, "bigvgan", "config.json"),
    }


def all_inputs(folder: str) -> list[str]:
    """Every file of the release folder (what copying "all the inputs" copies)."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f != STAMP and not f.startswith("."))


def ensure(folder: str, size: str = "full", log=print) -> str:
    """Generate the release folder unless a complete one is already there."""
    stamp = os.path.join(folder, STAMP)
    want = json.dumps({"version": VERSION, "size": size})
    if os.path.isfile(stamp) and open(stamp).read() == want and all(map(os.path.isfile, release_files(folder).values())):
        log(f"inputs: reusing {folder}")
        return folder
    t0 = time.time()
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(stamp):
        os.unlink(stamp)
    cfg = configs(size)
    mods = modules(cfg)
    gen = torch.Generator().manual_seed(2026)
    files = release_files(folder)
    small = [importlib.import_module(f"tests.upstream.{m}") for m in SMALL_MODELS]
    doc = dict(cfg["yaml"])
    for m in small:  # sections the release config has (the codec's, emo_num) keep the release's values
        for k, v in m.demo_config().items():
            doc.setdefault(k, v)
    with open(files["config"], "w") as f:
        f.write("# Synthetic bench release: random weights, real names and shapes (bench/inputs.py).\n")
        yaml.safe_dump(doc, f, sort_keys=False)
    for m in small:  # the small models at demo size (together well under 1% of the bytes at full size)
        m.write_demo(folder, doc)

    log("inputs: gpt.pth")
    sd = materialise(mods["gpt"].state_dict(), gen)
    _torch_save(sd, files["gpt"])
    del sd

    log("inputs: s2mel.pth")
    net = {k: materialise(m.state_dict(), gen) for k, m in mods["s2mel"].items()}
    optimizer = {}
    for k, m in mods["s2mel"].items():  # one Adam per sub-model, as upstream's training keeps them
        params = [p for p in m.parameters()]
        optimizer[k] = {
            "state": {i: {"step": torch.tensor(1000.0),
                          "exp_avg": torch.empty(p.shape).normal_(0, 1e-4, generator=gen),
                          "exp_avg_sq": torch.empty(p.shape).uniform_(0, 1e-6, generator=gen)}
                      for i, p in enumerate(params)},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-9, "weight_decay": 0.0, "params": list(range(len(params)))}],
        }
    _torch_save({"net": net, "optimizer": optimizer, "scheduler": {"last_epoch": 1000, "base_lrs": [1e-4]},
                 "epoch": 10, "iters": 1000}, files["s2mel"])
    del net, optimizer

    log("inputs: w2v-bert-2.0/model.safetensors")
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(files["w2v-bert"]), exist_ok=True)
    sd = materialise(mods["w2v"].state_dict(), gen)
    _save_atomic(files["w2v-bert"], lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, p, metadata={"format": "pt"}))
    del sd
    mods["w2v_config"].to_json_file(files["w2v-bert-config"])
    hidden = mods["w2v_config"].hidden_size
    _torch_save({"mean": torch.randn(hidden, generator=gen), "var": torch.rand(hidden, generator=gen) + 0.05}, files["stats"])

    log("inputs: bigvgan/bigvgan_generator.pt")
    os.makedirs(os.path.dirname(files["bigvgan"]), exist_ok=True)
    _torch_save({"generator": materialise(mods["bigvgan"].state_dict(), gen)}, files["bigvgan"])
    shutil.copyfile(_write_json(folder, cfg["bigvgan"]), files["bigvgan-config"])

    with open(stamp, "w") as f:
        f.write(want)
    total = sum(os.path.getsize(p) for p in all_inputs(folder))
    log(f"inputs: wrote {folder} ({total / 2**30:.2f} GiB) in {time.time() - t0:.0f} s")
    return folder


def _write_json(folder: str, obj: dict) -> str:
    path = os.path.join(folder, ".bigvgan_config.json")
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return path
