"""Reference runtime, BigVGAN: ``reference.bigvgan.vocode`` on the canonical file against
upstream ``BigVGAN.from_pretrained(folder)`` + ``remove_weight_norm()`` (infer_v2's loading)
on the saved source checkpoint."""

from __future__ import annotations

import math
import os

import pytest
import torch

from converters.cli import forward
from converters.format import schema
from reference import bigvgan as ref
from tests.helpers import ROOT, convert_in_process, reference_load, swap_rows
from tests.upstream import bigvgan as up

# The tiny release structure (snakebeta, log-scale snake, no final bias or tanh), and its
# opposite: plain snake in linear scale, with final bias and tanh.
SNAKE = {**up.TINY, "activation": "snake", "snake_logscale": False, "use_tanh_at_final": True,
         "use_bias_at_final": True, "resblock_dilation_sizes": [[1, 2], [1, 3, 5]]}
CONFIGS = {"tiny": up.TINY, "snake": SNAKE}


def upstream_from(folder: str):
    """What infer_v2 runs: from_pretrained on the release folder, weight norm removed, eval
    (``converters.cli.forward.bigvgan_model``, what ``verify --forward`` runs)."""
    return forward.bigvgan_model(os.path.join(folder, "bigvgan_generator.pt"), os.path.join(folder, "config.json"))


def upstream_run(m, mel):
    """Upstream waveform and its conv_post output (before tanh / clamp)."""
    out = forward.bigvgan_run(m, "vocode", {"mel": mel})
    return out["waveform"], out["conv_post"]


def build_scaled(config, seed):
    """The tiny builder's model with weight-norm gains scaled down (the conv_post gain kept),
    so activations stay O(1) and the waveform is not clamped."""
    m = up.build(config, seed=seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight_g") and not name.startswith("conv_post"):
                p.mul_(0.3)
    return m


def release(d, config, seed=0):
    up.save_release(build_scaled(config, seed), str(d / "bigvgan"), config)
    out = convert_in_process("bigvgan", d / "bigvgan", d / "bigvgan.safetensors")
    return upstream_from(str(d / "bigvgan")), out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    return release(tmp_path_factory.mktemp(f"bv_{request.param}"), CONFIGS[request.param])


def mel_batch(num_mels, frames=12, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_mels, frames, generator=g) - 1.0


def compare(m, path, mel, atol=1e-5):
    """Max abs differences (waveform, pre-clamp) between upstream and the reference,
    after asserting both are within atol; values are divided by the pre-clamp peak."""
    want, want_post = upstream_run(m, mel)
    acts = {}
    got = ref.vocode(reference_load(path), mel, acts)
    scale = max(1.0, float(want_post.abs().max()))
    assert got.shape == want.shape == (mel.shape[0], 1, mel.shape[2] * math.prod(m.h.upsample_rates))
    torch.testing.assert_close(acts["conv_post"] / scale, want_post / scale, rtol=0, atol=atol)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    return float((got - want).abs().max()), float((acts["conv_post"] - want_post).abs().max())


def test_vocode_matches_upstream(tiny):
    m, path = tiny
    mel = mel_batch(m.h.num_mels)
    want, _ = upstream_run(m, mel)
    assert 0.03 < want.abs().max() < 0.99  # a real signal, not clamped
    compare(m, path, mel)
    compare(m, path, mel_batch(m.h.num_mels, frames=1, batch=1, seed=3))  # a single frame


def test_vocode_matches_upstream_on_demo_release(tmp_path):
    """The committed demo's vocoder (unscaled gains: large activations, mostly clamped
    waveform), so the pre-clamp output is compared relative to its peak too."""
    out = convert_in_process("bigvgan", os.path.join(ROOT, "demo", "release", "bigvgan"), tmp_path / "bigvgan.safetensors")
    m = upstream_from(os.path.join(ROOT, "demo", "release", "bigvgan"))
    compare(m, out, mel_batch(m.h.num_mels, frames=10, seed=4) * 0.1)


def test_vocode_matches_upstream_at_release_structure(tmp_path):
    """The released config (80 mels, 6 upsamplers, kernels 3/7/11, dilations 1/3/5) at a
    twelfth of its width (128 initial channels instead of 1536, to keep the test quick),
    on the entry point's own input."""
    from bench.inputs import released

    cfg = {**released("bigvgan_v2_22khz_80band_256x"), "upsample_initial_channel": 128}
    m, path = release(tmp_path, cfg, seed=7)
    w = reference_load(path)
    (entry,) = ref.ENTRIES
    mel = entry.inputs(w.config, torch.Generator().manual_seed(0))["mel"]
    want, _ = upstream_run(m, mel)
    acts = {}
    got = entry.run(w, acts, mel=mel)["waveform"]
    assert got.shape == (1, 1, mel.shape[2] * 256) and want.abs().max() > 0.03
    assert sorted(acts) == sorted(["conv_pre", "conv_post", "waveform", *(f"ups.{u}" for u in range(6))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pairs", [
    [("resblocks.{r}.convs1.{c}.weight", "resblocks.{r}.convs2.{c}.weight"),
     ("resblocks.{r}.convs1.{c}.bias", "resblocks.{r}.convs2.{c}.bias")],
    [("resblocks.{r}.activations.{a}.alpha", "resblocks.{r}.activations.{a}.beta")],
], ids=["convs1-convs2", "alpha-beta"])
def test_swapped_rows_are_caught(tmp_path, monkeypatch, pairs):
    """A table that swaps two same-shape roles still writes a file that passes the schema
    check, but the reference output no longer matches upstream."""
    up.save_release(build_scaled(up.TINY, 0), str(tmp_path / "bigvgan"))
    m = upstream_from(str(tmp_path / "bigvgan"))
    swap_rows(monkeypatch, "bigvgan", *pairs)
    out = convert_in_process("bigvgan", tmp_path / "bigvgan", tmp_path / "bigvgan.safetensors")
    assert schema.check_file(str(out))[1] == []
    mel = mel_batch(up.TINY["num_mels"])
    want, want_post = upstream_run(m, mel)
    acts = {}
    ref.vocode(reference_load(out), mel, acts)
    assert (acts["conv_post"] - want_post).abs().max() > 1e-3


def test_entries_run_on_their_own_inputs(tiny):
    _, path = tiny
    w = reference_load(path)
    for e in ref.ENTRIES:
        inputs = e.inputs(w.config, torch.Generator().manual_seed(0))
        assert tuple(inputs) == e.args
        acts = {}
        out = e.run(w, acts, **inputs)
        assert tuple(out) == e.outputs
        frames = inputs["mel"].shape[2]
        assert out["waveform"].shape == (inputs["mel"].shape[0], 1, frames * 8)
        n = len(w.config["upsample_rates"])
        assert sorted(acts) == sorted(["conv_pre", "conv_post", "waveform", *(f"ups.{u}" for u in range(n))])
        assert acts["ups.0"].shape[-1] == frames * w.config["upsample_rates"][0]
