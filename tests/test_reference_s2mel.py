"""Reference runtime, s2mel: ``reference.s2mel`` on the canonical file against the
upstream ``MyModel`` loaded from the saved source checkpoint (gpt_layer, the length
regulator, and one call of the CFM estimator as ``CFM.solve_euler`` makes it)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from converters.cli import forward
from converters.format.schema import check_file
from reference import s2mel as ref
from tests.helpers import ROOT, convert_in_process, reference_load, swap_rows
from tests.upstream import s2mel as up

E = "cfm.estimator."
ATOL = 1e-5


# ------------------------------------------------------------------ upstream side


def save_release(folder, m, config) -> str:
    """A release folder: config.yaml and s2mel.pth (training checkpoint, DDP prefix)."""
    os.makedirs(folder, exist_ok=True)
    up.write_config(str(folder), config)
    up.save_training_checkpoint(m, os.path.join(str(folder), "s2mel.pth"))
    return str(folder)


def upstream_model(release_dir, config):
    """MyModel built from ``config``, every sub-model loaded from the saved ``s2mel.pth``
    by upstream's load_checkpoint2 (``net``, DDP prefix stripped; a tensor it leaves at
    its random init is refused), estimator caches set up as infer_v2 does:
    ``converters.cli.forward.s2mel_model``, what ``verify --forward`` runs."""
    return forward.s2mel_model(os.path.join(str(release_dir), "s2mel.pth"), copy.deepcopy(config))


ENTRY = {e.name: e for e in ref.ENTRIES}


# ------------------------------------------------------------------ inputs


def dit_case(cfg, B, T, lens, prompt, seed):
    g = torch.Generator().manual_seed(seed)
    C = cfg["in_channels"]
    x = torch.randn(B, C, T, generator=g)
    x[..., :prompt] = 0
    prompt_x = torch.zeros(B, C, T)
    prompt_x[..., :prompt] = torch.randn(B, C, prompt, generator=g)
    return {"x": x, "prompt_x": prompt_x, "x_lens": torch.tensor(lens, dtype=torch.int64),
            "t": torch.rand(B, generator=g), "style": torch.randn(B, cfg["style_dim"], generator=g),
            "cond": torch.randn(B, T, cfg["content_dim"], generator=g)}


def cases(cfg):
    """(entry, inputs) pairs: each entry's own inputs plus lengths and edge cases."""
    g = torch.Generator().manual_seed(7)
    out = [(e.name, e.inputs(cfg, torch.Generator().manual_seed(i))) for i, e in enumerate(ref.ENTRIES)]
    lr_in = cfg["length_regulator_in_channels"]
    out += [
        ("gpt_layer", {"latent": torch.randn(2, 5, cfg["gpt_layer_dims"][0], generator=g)}),
        # downsampling 13 -> 9 frames, second item masked after 4
        ("length_regulator", {"x": torch.randn(2, 13, lr_in, generator=g), "ylens": torch.tensor([4, 9])}),
        # 7 -> 14 (the doubling path) and 5 -> 5 (identity)
        ("length_regulator", {"x": torch.randn(1, 7, lr_in, generator=g), "ylens": torch.tensor([14])}),
        ("length_regulator", {"x": torch.randn(2, 5, lr_in, generator=g), "ylens": torch.tensor([5, 5])}),
        # padding in both items of a batch
        ("dit", dit_case(cfg, 2, 20, [17, 11], 6, 1)),
        # CFG as solve_euler runs it: batch 2, x_lens of batch 1 (broadcast), no padding
        ("dit", dit_case(cfg, 2, 16, [16], 5, 2)),
        # shorter than the deepest WaveNet layer's padding: upstream's zero-extended reflect
        ("dit", dit_case(cfg, 1, 6, [6], 2, 3)),
    ]
    return out


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def compare(w, m, name, inputs):
    e = ENTRY[name]
    got = e.run(w, None, **inputs)[e.outputs[0]]
    want = forward.s2mel_run(m, name, inputs)[e.outputs[0]]
    return got, want


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2mel_ref")
    rel = save_release(d / "release", up.build(up.TINY, seed=0), up.TINY)
    out = convert_in_process("s2mel", rel, d / "s2mel.safetensors")
    return {"dir": d, "release": rel, "file": out, "w": reference_load(out), "m": upstream_model(rel, up.TINY)}


# ------------------------------------------------------------------ tests


def test_matches_upstream(tiny):
    w, m = tiny["w"], tiny["m"]
    seen = set()
    for name, inputs in cases(w.config):
        got, want = compare(w, m, name, inputs)
        assert want.abs().max() > 1e-1, name  # not two near-zero signals
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=lambda s: f"{name}: {s}")
        seen.add(name)
    assert seen == set(ENTRY)


def test_masks_and_lengths(tiny):
    """Padded frames do not change an item's valid frames in the transformer (padded
    keys are never attended); the WaveNet head reaches over the boundary only as far as
    its convolutions do (its first layer's input is not masked); the length regulator's
    output is zero past each item's length."""
    w, cfg = tiny["w"], tiny["w"].config
    T, n = 40, 26
    inp = dit_case(cfg, 2, T, [T, n], 6, 4)
    acts, acts2 = {}, {}
    out = ref.dit(w, **inp, acts=acts)
    alt = dict(inp, x=inp["x"].clone(), cond=inp["cond"].clone())
    alt["x"][1, :, n:] += 5.0
    alt["cond"][1, n:] -= 3.0
    out2 = ref.dit(w, **alt, acts=acts2)
    last = f"transformer.{cfg['depth'] - 1}"
    torch.testing.assert_close(acts2[last][1, :n], acts[last][1, :n], rtol=0, atol=ATOL)
    assert max_diff(acts2[last][1, n:], acts[last][1, n:]) > 1e-2
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=0)
    reach = sum((cfg["wavenet_kernel_size"] - 1) // 2 * cfg["wavenet_dilation_rate"] ** i
                for i in range(cfg["wavenet_num_layers"]))
    assert n - reach > 4
    torch.testing.assert_close(out2[1, :, :n - reach], out[1, :, :n - reach], rtol=0, atol=ATOL)
    assert max_diff(out2[1, :, n - reach:n], out[1, :, n - reach:n]) > 1e-3
    lr = ref.length_regulator(w, torch.randn(2, 6, cfg["length_regulator_in_channels"]), torch.tensor([11, 7]))
    assert lr.shape[1] == 11 and lr[1, 7:].abs().max() == 0 and lr[1, :7].abs().max() > 1e-2


def test_variant_configs_match_upstream(tmp_path):
    """Config flags the forward reads: no U-ViT skips, no long skip, causal attention
    (lengths then not applied in attention); and no style conditioning."""
    no_style = copy.deepcopy(up.TINY)
    no_style["DiT"]["style_condition"] = no_style["wavenet"]["style_condition"] = False
    no_style["wavenet"].update(num_layers=2, dilation_rate=1, kernel_size=3)
    variants = {
        "flags": up.variant(uvit_skip_connection=False, long_skip_connection=False, is_causal=True, depth=2),
        "no_style": no_style,
    }
    for tag, cfg in variants.items():
        rel = save_release(tmp_path / tag, up.build(cfg, seed=3), cfg)
        w = reference_load(convert_in_process("s2mel", rel, tmp_path / f"{tag}.safetensors"))
        m = upstream_model(rel, cfg)
        if tag == "flags":
            assert w.config["is_causal"] and not w.config["long_skip_connection"]
            assert w.config["uvit_skip_from"] == [-1, -1]
        else:
            assert not w.config["style_condition"]
        got, want = compare(w, m, "dit", dit_case(w.config, 2, 14, [14, 9], 4, 5))
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=lambda s: f"{tag}: {s}")


def test_demo_release_matches_upstream(tmp_path):
    """The committed demo release (a float16 checkpoint).  Converted to float32, every
    entry matches upstream to 1e-5.  Converted keeping float16, the copied tensors still
    match exactly, but the weight-norm folds (computed in float32, then stored in
    float16) are rounded once more than upstream's (which folds the float16 g and v in
    float32 at run time), so the estimator only agrees to float16 precision."""
    import yaml

    from converters.release import engine

    rel = os.path.join(ROOT, "demo", "release")
    with open(os.path.join(rel, "config.yaml")) as f:
        config = yaml.safe_load(f)["s2mel"]
    m = upstream_model(rel, config)
    for dtype in ("float32", "keep"):
        out = str(tmp_path / f"{dtype}.safetensors")
        engine.convert("s2mel", rel, out, None, dtype=dtype, quiet=True, force=True)
        w = reference_load(out)
        for name, inputs in cases(w.config):
            got, want = compare(w, m, name, inputs)
            atol = 1e-2 * float(want.abs().max()) if (dtype, name) == ("keep", "dit") else ATOL
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda s: f"demo {dtype} {name}: {s}")


L0 = E + "transformer.layers.{l}."
SWAPS = {
    "attention q/k": [(L0 + "attention.q.weight", L0 + "attention.k.weight")],
    "wavenet filter/gate": [(f"{E}wavenet.in_layers.0.filter.{p}", f"{E}wavenet.in_layers.0.gate.{p}")
                            for p in ("weight", "bias")],
    "wavenet res/skip": [(f"{E}wavenet.res_skip_layers.0.res.{p}", f"{E}wavenet.res_skip_layers.0.skip.{p}")
                         for p in ("weight", "bias")],
    "adaLN scale/shift": [(f"{E}transformer.norm.scale_proj.{p}", f"{E}transformer.norm.shift_proj.{p}")
                          for p in ("weight", "bias")],
}


@pytest.mark.parametrize("swap", list(SWAPS))
def test_swapped_rows_are_caught(tiny, swap, tmp_path, monkeypatch):
    """Exchanging two canonical names in the converter's table keeps the file valid
    (check_file passes) but the reference no longer matches upstream."""
    swap_rows(monkeypatch, "s2mel", *SWAPS[swap])
    out = convert_in_process("s2mel", tiny["release"], tmp_path / "swapped.safetensors")
    assert check_file(str(out))[1] == []
    w = reference_load(out)
    inputs = dit_case(w.config, 2, 16, [16, 12], 5, 8)
    got, want = compare(w, tiny["m"], "dit", inputs)
    assert max_diff(got, want) > 1e-3, swap


def test_entries_run_on_their_own_inputs(tiny):
    w, cfg = tiny["w"], tiny["w"].config
    expect_acts = {
        "gpt_layer": {f"gpt_layer.{g}" for g in range(len(cfg["gpt_layer_dims"]) - 1)},
        "length_regulator": {f"length_regulator.{b}" for b in range(len(cfg["length_regulator_sampling_ratios"]))},
        "dit": {f"transformer.{l}" for l in range(cfg["depth"])} | {f"wavenet.{i}" for i in range(cfg["wavenet_num_layers"])},
    }
    for e in ref.ENTRIES:
        inputs = e.inputs(cfg, torch.Generator().manual_seed(0))
        assert tuple(inputs) == e.args
        for k, v in inputs.items():
            assert v.dtype in (torch.float32, torch.int64), (e.name, k)
        acts = {}
        out = e.run(w, acts, **inputs)
        assert tuple(out) == e.outputs and all(torch.isfinite(v).all() for v in out.values())
        assert set(acts) == expect_acts[e.name], e.name
    # the inputs are deterministic
    for e in ref.ENTRIES:
        a, b = (e.inputs(cfg, torch.Generator().manual_seed(3)) for _ in range(2))
        assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the CFM sampler


@pytest.mark.parametrize("cfg_rate,steps", [(0.7, 25), (0.0, 4)])
def test_cfm_sampler_matches_upstream(tiny, cfg_rate, steps):
    """``reference.s2mel.cfm_inference`` against upstream's ``CFM.inference`` (noise drawn
    inside from the seeded global generator; the reference is given the same draw)."""
    w, m = tiny["w"], tiny["m"]
    cfg = w.config
    g = torch.Generator().manual_seed(11)
    T, prompt = 21, 7
    cond = torch.randn(1, T, cfg["content_dim"], generator=g)
    ref_mel = torch.randn(1, cfg["in_channels"], prompt, generator=g)
    style = torch.randn(1, cfg["style_dim"], generator=g)
    torch.manual_seed(5)
    noise = torch.randn(1, cfg["in_channels"], T)
    torch.manual_seed(5)
    with torch.no_grad():
        want = m.models["cfm"].inference(cond, torch.LongTensor([T]), ref_mel, style, None, steps,
                                         inference_cfg_rate=cfg_rate)
    got = ref.cfm_inference(w, cond, ref_mel, style, noise, steps, cfg_rate)
    assert want[..., prompt:].abs().max() > 1e-1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # the CFG rate matters: the other sign of the guidance is far off
    if cfg_rate:
        other = ref.cfm_inference(w, cond, ref_mel, style, noise, steps, -cfg_rate)
        assert (other - want).abs().max() > 1e-2
