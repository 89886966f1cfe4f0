"""Reference runtime, GPT (UnifiedVoice v2): ``reference.gpt`` on the canonical file
against the upstream class loaded from the saved source checkpoint with upstream's own
loader (``indextts.utils.checkpoint.load_checkpoint``: ``torch.load`` + strict
``load_state_dict``)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from converters.cli import forward
from converters.models import gpt as conv
from converters.format.schema import check_file
from reference import gpt as ref
from tests.helpers import ROOT, convert_in_process, reference_load, swap_rows
from bench.inputs import released
from tests.upstream import gpt as up

DEMO = os.path.join(ROOT, "demo", "release")
ENTRY = {e.name: e for e in ref.ENTRIES}

# The released checkpoint's gpt: section (IndexTTS-2 config.yaml), for the full-size input check.
RELEASED = released("indextts2")["gpt"]


def upstream_model(pth: str, cfg: dict):
    """A fresh UnifiedVoice loaded from the saved checkpoint the way infer_v2 loads it
    (``converters.cli.forward.gpt_model``, what ``verify --forward`` runs)."""
    torch.manual_seed(99)  # another init: every value must come from the file
    return forward.gpt_model(str(pth), cfg)


def upstream_run(m, name: str, x: dict) -> tuple[dict, dict]:
    """Upstream outputs for one entry point (``converters.cli.forward.gpt_run``), and its
    per-block activations (by hooks)."""
    acts, hooks = {}, []

    def keep(key, fn=lambda i, o: o):
        def hook(mod, i, o):  # the first pass only (merge_emovec: the emotion reference's); returns None
            if key not in acts:
                acts[key] = fn(i, o)
        return hook

    for enc in ("conditioning_encoder", "emo_conditioning_encoder"):
        for b, layer in enumerate(getattr(m, enc).encoders):
            hooks.append(layer.register_forward_hook(keep(f"{enc}.{b}", lambda i, o: o[0])))
    for per in ("perceiver_encoder", "emo_perceiver_encoder"):
        for l, (_, ff) in enumerate(getattr(m, per).layers):  # latents after layer l = ff(x) + x
            hooks.append(ff.register_forward_hook(keep(f"{per}.{l}", lambda i, o: o + i[0])))
    for i, block in enumerate(m.gpt.h):
        hooks.append(block.register_forward_hook(keep(f"gpt.{i}", lambda i, o: o[0] if isinstance(o, tuple) else o)))
    hooks.append(m.final_norm.register_forward_hook(keep("final_norm")))
    try:
        out = forward.gpt_run(m, name, x)
    finally:
        for h in hooks:
            h.remove()
    return out, acts


def compare(w, m, name: str, x: dict, acts_too: bool = True) -> float:
    """Reference vs upstream within 1e-5 on every output (and activation); returns the max abs diff."""
    mine_acts: dict = {}
    got = ENTRY[name].run(w, mine_acts, **x)
    want, up_acts = upstream_run(m, name, x)
    worst = 0.0
    pairs = [(k, got[k], want[k]) for k in ENTRY[name].outputs]
    if acts_too:
        shared = sorted(set(mine_acts) & set(up_acts))
        assert shared, name
        pairs += [(k, mine_acts[k], up_acts[k]) for k in shared]
    for k, a, b in pairs:
        assert b.abs().max() > 1e-2, f"{name}/{k}: near-zero signal"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda s, k=k: f"{name}/{k}: {s}")
        worst = max(worst, float((a - b).abs().max()))
    return worst


def max_diff(w, m, name: str, x: dict) -> float:
    got = ENTRY[name].run(w, None, **x)
    want, _ = upstream_run(m, name, x)
    return max(float((got[k] - want[k]).abs().max()) for k in ENTRY[name].outputs)


def inputs(w, name: str, seed: int = 0) -> dict:
    return ENTRY[name].inputs(w.config, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    src = up.save_release(up.build(), str(d / "release"))
    out = convert_in_process("gpt", src, d / "gpt.safetensors")
    return reference_load(out), upstream_model(src, up.TINY), src


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = convert_in_process("gpt", DEMO, tmp_path_factory.mktemp("gpt_demo") / "gpt.safetensors")
    with open(os.path.join(DEMO, "config.yaml")) as f:
        cfg = yaml.safe_load(f)["gpt"]
    return reference_load(out), upstream_model(os.path.join(DEMO, "gpt.pth"), cfg)


# ------------------------------------------------------------------ against upstream


@pytest.mark.parametrize("name", list(ENTRY))
def test_matches_upstream(tiny, name):
    w, m, _ = tiny
    for seed in range(2):
        compare(w, m, name, inputs(w, name, seed))


@pytest.mark.parametrize("name", list(ENTRY))
def test_demo_release_matches_upstream(demo, name):
    """The committed demo release (gpt.pth stored in float16; upstream loads it into a
    float32 module, the reference computes in float32 from the F16 canonical file)."""
    w, m = demo
    assert w.metadata["dtype"] == "F16"
    compare(w, m, name, inputs(w, name))


def test_lengths_and_batch_variants(tiny):
    """infer_v2's lengths (the feature width, 1024, past the last frame: nothing padded),
    a single item, and a heavily padded item (a key-only-masked tail)."""
    w, m, _ = tiny
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1024, 23, generator=g)
    for lengths in ([1024, 1024], [23, 6]):
        n = torch.tensor(lengths)
        compare(w, m, "conditioning", {"feats": x, "lengths": n})
        compare(w, m, "emovec", {"feats": x, "lengths": n})
    compare(w, m, "conditioning", {"feats": x[:1], "lengths": torch.tensor([23])})
    f = inputs(w, "forward_latents", 3)
    one = {k: v[:1] for k, v in f.items()}
    compare(w, m, "forward_latents", one)
    f["text_lengths"], f["code_lengths"] = torch.tensor([1, 6]), torch.tensor([1, 2])
    compare(w, m, "forward_latents", f)


def test_padding_is_not_a_no_op(tiny):
    """Shortening one item's length changes that item only, and upstream agrees."""
    w, m, _ = tiny
    x = inputs(w, "conditioning")
    short = x["lengths"] - torch.tensor([0, 4])
    a = ref.conditioning(w, x["feats"], x["lengths"])
    b = ref.conditioning(w, x["feats"], short)
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() > 1e-3
    compare(w, m, "conditioning", {"feats": x["feats"], "lengths": short})


# ------------------------------------------------------------------ sensitivity

SWAPS = [
    ("forward_latents", [("gpt.h.{i}.attn.q.weight", "gpt.h.{i}.attn.k.weight"),
                         ("gpt.h.{i}.attn.q.bias", "gpt.h.{i}.attn.k.bias")]),
    ("conditioning", [("conditioning_encoder.encoders.{cb}.conv_module.pointwise_conv1.value.weight",
                       "conditioning_encoder.encoders.{cb}.conv_module.pointwise_conv1.gate.weight"),
                      ("conditioning_encoder.encoders.{cb}.conv_module.pointwise_conv1.value.bias",
                       "conditioning_encoder.encoders.{cb}.conv_module.pointwise_conv1.gate.bias")]),
    ("conditioning", [("perceiver_encoder.layers.{pl}.attn.to_k.weight", "perceiver_encoder.layers.{pl}.attn.to_v.weight")]),
    ("conditioning", [("perceiver_encoder.layers.{pl}.ff.value.weight", "perceiver_encoder.layers.{pl}.ff.gate.weight"),
                      ("perceiver_encoder.layers.{pl}.ff.value.bias", "perceiver_encoder.layers.{pl}.ff.gate.bias")]),
    ("emovec", [("emo_perceiver_encoder.layers.{el}.attn.to_k.weight", "emo_perceiver_encoder.layers.{el}.attn.to_v.weight")]),
]


@pytest.mark.parametrize("name,pairs", SWAPS, ids=[p[0][0].split(".{")[0] + ":" + p[0][0].rsplit(".", 2)[-2] for _, p in SWAPS])
def test_swapped_rows_are_caught(tiny, tmp_path, monkeypatch, name, pairs):
    """A converter that exchanged two same-shaped parts writes a file that passes the
    schema check; the reference comparison with upstream fails."""
    w, m, src = tiny
    x = inputs(w, name)  # test_matches_upstream: the unswapped file agrees within 1e-5
    swap_rows(monkeypatch, "gpt", *pairs)
    bad = convert_in_process("gpt", src, tmp_path / "bad.safetensors")
    assert check_file(str(bad))[1] == []
    assert max_diff(reference_load(bad), m, name, x) > 1e-3


# ------------------------------------------------------------------ entries


def test_entries_run_on_their_own_inputs(tiny):
    w, _, _ = tiny
    cfg = w.config
    d, n_lat = cfg["model_dim"], cfg["condition_num_latent"]
    g = torch.Generator().manual_seed(0)
    for e in ref.ENTRIES:
        x = e.inputs(cfg, g)
        assert tuple(x) == e.args, e.name
        assert all(v.dtype in (torch.float32, torch.int64) for v in x.values()), e.name
        acts: dict = {}
        out = e.run(w, acts, **x)
        assert tuple(out) == e.outputs, e.name
        assert all(torch.isfinite(v).all() for v in out.values()), e.name
        if e.name == "conditioning":
            assert out["latents"].shape == (2, n_lat, d)
            want = {f"conditioning_encoder.{b}" for b in range(cfg["conditioning_encoder"]["num_blocks"])}
            want |= {f"perceiver_encoder.{l}" for l in range(cfg["perceiver_encoder"]["depth"])}
        elif e.name in ("emovec", "merge_emovec"):
            assert out["emovec"].shape == (2, d)
            want = {f"emo_conditioning_encoder.{b}" for b in range(cfg["emo_conditioning_encoder"]["num_blocks"])}
            want |= {f"emo_perceiver_encoder.{l}" for l in range(cfg["emo_perceiver_encoder"]["depth"])}
        else:
            lm = x["codes"].shape[1]
            assert out["latents"].shape == (2, lm, d)
            assert out["mel_logits"].shape == (2, lm + 2, cfg["number_mel_codes"])
            want = {f"gpt.{i}" for i in range(cfg["layers"])}
        assert want <= set(acts), (e.name, sorted(want - set(acts)))


def test_inputs_valid_at_full_size():
    """At the released config the inputs stay short and inside every table."""
    cfg = conv.runtime_config(RELEASED, "config.yaml")
    g = torch.Generator().manual_seed(0)
    for e in ref.ENTRIES:
        x = e.inputs(cfg, g)
        assert sum(v.numel() for v in x.values()) < 200_000, e.name
    x = ENTRY["forward_latents"].inputs(cfg, g)
    assert x["cond_latents"].shape[1:] == (cfg["condition_num_latent"], cfg["model_dim"])
    assert x["text"].shape[1] + 2 <= cfg["text_positions"] and x["codes"].shape[1] + 2 <= cfg["mel_positions"]
    assert int(x["text"].max()) < cfg["text_vocab_size"] and int(x["codes"].max()) < cfg["start_mel_token"]
    for name in ("conditioning", "emovec"):
        f = ENTRY[name].inputs(cfg, g)
        t = f["feats"].shape[2]
        assert f["feats"].shape[1] == cfg["conditioning_encoder"]["input_size"] and t < cfg["conditioning_encoder"]["pos_enc_max_len"]
        assert int(f["lengths"].min()) >= 3  # at least one valid subsampled frame
