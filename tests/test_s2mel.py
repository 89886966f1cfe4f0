"""s2mel (DiT flow-matching estimator, length regulator, gpt_layer) end to end against
the upstream classes (the oracle tier)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.format import ops, schema
from tests.helpers import assert_dtype_policy, assert_refused, back_to_upstream, load_canonical, metadata, rewrite, run_cli
from tests.upstream import s2mel as up

B, T = 2, 20


def _inputs(config=None):
    cfg = config or up.TINY
    g = torch.Generator().manual_seed(1)
    d, lr = cfg["DiT"], cfg["length_regulator"]
    return {
        "x": torch.randn(B, d["in_channels"], T, generator=g),
        "prompt_x": torch.randn(B, d["in_channels"], T, generator=g),
        "x_lens": torch.tensor([T, T - 6]),
        "t": torch.tensor([0.3, 0.8]),
        "style": torch.randn(B, cfg["style_encoder"]["dim"], generator=g),
        "cond": torch.randn(B, T, d["content_dim"], generator=g),
        "lr_in": torch.randn(B, 7, lr["in_channels"], generator=g),
        "ylens": torch.tensor([T, T - 7]),
        "latent": torch.randn(B, 5, 1280, generator=g),  # upstream hard-codes gpt_layer = Linear(1280, 256), ...
    }


def _forward(m, inp):
    """The three inference entry points: the CFM estimator (DiT), the length regulator,
    and the GPT-latent MLP."""
    est = m.models["cfm"].estimator
    est.setup_caches(max_batch_size=B, max_seq_length=T)
    with torch.no_grad():
        v = est(inp["x"], inp["prompt_x"], inp["x_lens"], inp["t"], inp["style"], inp["cond"])
        cond = m.models["length_regulator"](inp["lr_in"], ylens=inp["ylens"])[0]
        lat = m.models["gpt_layer"](inp["latent"])
    return {"estimator": v, "length_regulator": cond, "gpt_layer": lat}


def _load_back(sd: dict, config=None, seed: int = 123):
    """A fresh upstream model (other random init, weight norm removed) loaded with the
    tensors mapped back through provenance.  Per sub-module with strict=False, and then
    the exact set of keys left at their random init is checked: only what the
    converter dropped as unused."""
    fresh = up.folded(up.build(config, seed=seed))
    not_loaded = set()
    for key in up.SUBMODULES:
        part = {n[len(key) + 1:]: t for n, t in sd.items() if n.startswith(key + ".")}
        res = fresh.models[key].load_state_dict(part, strict=False)
        assert res.unexpected_keys == [], res.unexpected_keys
        not_loaded |= {f"{key}.{n}" for n in res.missing_keys}
    return fresh.eval(), not_loaded


def _convert(tmp_path, m, fmt="pth", config=None, name="out"):
    rel = tmp_path / f"rel_{name}"
    rel.mkdir()
    up.write_config(str(rel), config)
    if fmt == "pth":
        up.save_training_checkpoint(m, str(rel / "s2mel.pth"))
    else:
        up.save_flat_safetensors(m, str(rel / "s2mel.safetensors"))
    out = tmp_path / f"{name}.safetensors"
    run_cli("s2mel", rel, out, "--quiet")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny model, its reference outputs, and its conversions from both source
    formats (a training checkpoint with a `module.` prefix, and a flat dump)."""
    tmp = tmp_path_factory.mktemp("s2mel")
    m = up.build()
    inp = _inputs()
    return {"m": m, "inp": inp, "ref": _forward(m, inp), "tmp": tmp,
            "pth": _convert(tmp, m, "pth", name="pth"), "safetensors": _convert(tmp, m, "safetensors", name="flat")}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_forward_matches_upstream(tiny, fmt):
    inp, ref, out = tiny["inp"], tiny["ref"], tiny[fmt]
    assert schema.check_file(str(out))[1] == []
    fresh, not_loaded = _load_back(back_to_upstream(out))
    dropped = set(json.loads(metadata(out)["dropped"]))
    # Left at random init = exactly the dropped tensors, with weight norm folded names.
    assert not_loaded == {ops.folded_name(n) if n.endswith(ops.WN_SUFFIXES) else n
                          for n in dropped if not n.endswith("weight_g")} - {"optimizer", "scheduler", "epoch", "iters"}
    got = _forward(fresh, inp)
    for k in ref:
        assert ref[k].abs().max() > 1e-2, k  # not comparing two near-zero signals
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda s: f"{k}: {s}")


def test_variant_config_matches_upstream(tmp_path):
    """Other structural flags: no U-ViT skips, no long skip, causal attention."""
    cfg = up.variant(uvit_skip_connection=False, long_skip_connection=False, is_causal=True, depth=2)
    m = up.build(cfg)
    inp = _inputs(cfg)
    ref = _forward(m, inp)
    out = _convert(tmp_path, m, "pth", cfg)
    c = json.loads(metadata(out)["config"])
    assert not c["uvit_skip_connection"] and not c["long_skip_connection"] and c["is_causal"]
    t, _ = load_canonical(out)
    assert "cfm.estimator.skip_linear.weight" not in t
    assert not any("skip_in_linear" in n for n in t)
    fresh, _ = _load_back(back_to_upstream(out), cfg)
    got = _forward(fresh, inp)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)


def test_oracle_is_sensitive(tiny):
    """The comparison can fail: swapping two canonical tensors of the same shape (the
    WaveNet filter and gate halves; then the attention q and k) changes the output."""
    inp, ref = tiny["inp"], tiny["ref"]
    t, prov = load_canonical(tiny["pth"])
    E = "cfm.estimator."
    for a, b in ((f"{E}wavenet.in_layers.1.filter.weight", f"{E}wavenet.in_layers.1.gate.weight"),
                 (f"{E}transformer.layers.2.attention.q.weight", f"{E}transformer.layers.2.attention.k.weight")):
        bad = dict(t)
        bad[a], bad[b] = t[b], t[a]
        fresh, _ = _load_back(ops.invert(prov, bad))
        assert not torch.allclose(_forward(fresh, inp)["estimator"], ref["estimator"], atol=1e-3), (a, b)


def test_canonical_values(tiny):
    """Splits and folds are the documented formulas, tensor by tensor."""
    m, out = tiny["m"], tiny["pth"]
    t, prov = load_canonical(out)
    sd = {f"{k}.{n}": v for k, s in up.net(m).items() for n, v in s.items()}
    E, d, h = "cfm.estimator.", up.TINY["DiT"]["hidden_dim"], up.TINY["wavenet"]["hidden_dim"]
    L = up.TINY["wavenet"]["num_layers"]
    wqkv = sd[f"{E}transformer.layers.1.attention.wqkv.weight"]
    for i, p in enumerate("qkv"):
        torch.testing.assert_close(t[f"{E}transformer.layers.1.attention.{p}.weight"], wqkv[i * d:(i + 1) * d], rtol=0, atol=0)
    # AdaptiveLayerNorm: upstream splits project_layer(c) into (weight=scale, bias=shift).
    pw = sd[f"{E}transformer.norm.project_layer.weight"]
    torch.testing.assert_close(t[f"{E}transformer.norm.scale_proj.weight"], pw[:d], rtol=0, atol=0)
    torch.testing.assert_close(t[f"{E}transformer.norm.shift_proj.bias"], sd[f"{E}transformer.norm.project_layer.bias"][d:], rtol=0, atol=0)
    # FinalLayer: adaLN_modulation(c).chunk(2) = (shift, scale): the other order.
    aw = sd[f"{E}final_layer.adaLN_modulation.1.weight"]
    torch.testing.assert_close(t[f"{E}final_layer.shift_proj.weight"], aw[:h], rtol=0, atol=0)
    torch.testing.assert_close(t[f"{E}final_layer.scale_proj.weight"], aw[h:], rtol=0, atol=0)

    def fold(mod):
        g, v = sd[f"{mod}.weight_g"], sd[f"{mod}.weight_v"]
        return g * v / v.norm(dim=tuple(range(1, v.dim())), keepdim=True)

    assert not torch.allclose(sd[f"{E}final_layer.linear.weight_g"].squeeze(1), sd[f"{E}final_layer.linear.weight_v"].norm(dim=1))
    torch.testing.assert_close(t[f"{E}final_layer.linear.weight"], fold(f"{E}final_layer.linear"))
    cw = fold(f"{E}wavenet.cond_layer.conv.conv")  # [2 h L, h, 1]
    assert cw.shape[0] == 2 * h * L
    torch.testing.assert_close(t[f"{E}wavenet.cond_layer.2.gate.weight"], cw[5 * h:6 * h, :, 0])
    torch.testing.assert_close(t[f"{E}wavenet.cond_layer.1.filter.bias"], sd[f"{E}wavenet.cond_layer.conv.conv.bias"][2 * h:3 * h], rtol=0, atol=0)
    iw = fold(f"{E}wavenet.in_layers.0.conv.conv")
    torch.testing.assert_close(t[f"{E}wavenet.in_layers.0.gate.weight"], iw[h:])
    rs = fold(f"{E}wavenet.res_skip_layers.0.conv.conv")
    torch.testing.assert_close(t[f"{E}wavenet.res_skip_layers.0.skip.weight"], rs[h:, :, 0])
    assert f"{E}wavenet.res_skip_layers.{L - 1}.res.weight" not in t  # last layer: skip only
    torch.testing.assert_close(t["length_regulator.blocks.2.norm.weight"], sd["length_regulator.model.7.weight"], rtol=0, atol=0)
    torch.testing.assert_close(t["length_regulator.out_proj.weight"], sd["length_regulator.model.12.weight"][:, :, 0], rtol=0, atol=0)
    assert prov[f"{E}wavenet.cond_layer.2.gate.weight"] == {
        "from": [f"{E}wavenet.cond_layer.conv.conv.weight_g", f"{E}wavenet.cond_layer.conv.conv.weight_v"],
        "op": f"fold_weight_norm(dim=0)|split(dim=0,index=5,parts={2 * L})|squeeze(dim=2)"}
    # U-ViT: only receiving layers keep skip_in_linear; the metadata says who sends.
    cfg = json.loads(metadata(out)["config"])
    assert cfg["uvit_skip_from"] == [-1, -1, -1, 1, 0]
    assert sorted(n for n in t if n.endswith("skip_in_linear.weight")) == [
        f"{E}transformer.layers.3.skip_in_linear.weight", f"{E}transformer.layers.4.skip_in_linear.weight"]


def test_training_checkpoint_reading(tiny):
    """Optimizer state and counters beside `net` are recorded, never converted; the
    `module.` prefix inside one sub-dict is stripped."""
    out = tiny["pth"]
    dropped = json.loads(metadata(out)["dropped"])
    for k in ("optimizer", "scheduler", "epoch", "iters"):
        assert "beside the 'net' wrapper" in dropped[k]
    assert not any(n.startswith("module.") or ".module." in n for n in json.loads(metadata(out)["provenance"]))
    prov = json.loads(metadata(out)["provenance"])
    assert prov["length_regulator.content_in_proj.weight"]["from"] == ["length_regulator.content_in_proj.weight"]


def test_pth_and_flat_dump_agree(tiny):
    a, b = load_file(tiny["pth"]), load_file(tiny["safetensors"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _flat_dump(tmp_path, m, edit) -> str:
    rel = tmp_path / "flat"
    rel.mkdir()
    up.write_config(str(rel))
    flat = {f"{k}.{n}": v.contiguous() for k, s in up.net(m).items() for n, v in s.items()}
    edit(flat)
    save_file(flat, str(rel / "s2mel.safetensors"))
    return rel


def test_freqs_regenerated_when_absent(tmp_path):
    m = up.build()
    rel = _flat_dump(tmp_path, m, lambda f: (f.pop("cfm.estimator.t_embedder.freqs"), f.pop("cfm.estimator.t_embedder2.freqs")))
    out = tmp_path / "o.safetensors"
    run_cli("s2mel", rel, out, "--quiet")
    t, prov = load_canonical(out)
    assert prov["cfm.estimator.t_embedder.freqs"]["from"] == []
    assert torch.equal(t["cfm.estimator.t_embedder.freqs"], m.models["cfm"].estimator.t_embedder.freqs)
    assert torch.equal(t["cfm.estimator.t_embedder2.freqs"], m.models["cfm"].estimator.t_embedder2.freqs)
    assert schema.check_file(str(out))[1] == []


def test_missing_parameter_is_an_error(tmp_path):
    """Upstream would silently keep a random init; the converter names the tensor."""
    rel = _flat_dump(tmp_path, up.build(), lambda f: f.pop("cfm.estimator.transformer.layers.4.skip_in_linear.weight"))
    p = run_cli("s2mel", rel, tmp_path / "o.safetensors", "--quiet", expect=None)
    assert_refused(p, "missing tensors", "layers.4.skip_in_linear.weight")


def test_wrong_shape_is_an_error(tmp_path):
    def edit(f):
        f["cfm.estimator.transformer.layers.0.attention.wqkv.weight"] = torch.zeros(47, 16)
    rel = _flat_dump(tmp_path, up.build(), edit)
    p = run_cli("s2mel", rel, tmp_path / "o.safetensors", "--quiet", expect=None)
    assert_refused(p, "layers.0.attention.wqkv.weight")


def test_unknown_module_is_an_error(tmp_path):
    rel = _flat_dump(tmp_path, up.build(), lambda f: f.update({"emo_layer.weight": torch.zeros(3, 3)}))
    p = run_cli("s2mel", rel, tmp_path / "o.safetensors", "--quiet", expect=None)
    assert_refused(p, "unexpected tensors", "emo_layer.weight")


def test_unsupported_config_is_refused(tmp_path):
    cfg = up.variant(final_layer_type="mlp")
    rel = tmp_path / "r"
    rel.mkdir()
    up.write_config(str(rel), cfg)
    up.save_training_checkpoint(up.build(), str(rel / "s2mel.pth"))
    assert_refused(run_cli("s2mel", rel, tmp_path / "o.safetensors", "--quiet", expect=None), "final_layer_type")


def test_fold_then_split_op_inverts():
    """The ops addition this converter needs: split right after fold_weight_norm."""
    g, v = torch.rand(6, 1, 1) + 0.5, torch.randn(6, 4, 1)
    w = torch._weight_norm(v, g, 0)
    prov, tensors = {}, {}
    for i in range(3):
        op = f"fold_weight_norm(dim=0)|split(dim=0,index={i},parts=3)|squeeze(dim=2)"
        tensors[f"p{i}"] = ops.apply(op, [g, v])
        prov[f"p{i}"] = {"from": ["m.weight_g", "m.weight_v"], "op": op}
        assert ops.out_shape(op, [g.shape, v.shape]) == (2, 4)
        torch.testing.assert_close(tensors[f"p{i}"], w[2 * i:2 * i + 2, :, 0])
    back = ops.invert(prov, tensors)
    assert list(back) == ["m.weight"]
    torch.testing.assert_close(back["m.weight"], w)
    with pytest.raises(ops.OpError):
        ops.parse("copy|split(dim=0,index=0,parts=2)")  # split elsewhere stays first-only


def test_dtype_option_and_check(tiny, tmp_path):
    out = tiny["pth"]
    half = tmp_path / "h.safetensors"
    run_cli("s2mel", tiny["tmp"] / "rel_pth", half, "--dtype", "float16", "--quiet")
    t, _ = load_canonical(half)
    assert {x.dtype for x in t.values()} == {torch.float16, torch.float32}
    assert t["cfm.estimator.t_embedder.freqs"].dtype == torch.float32  # the dtype policy's classes
    assert_dtype_policy(half, "F16")
    # A tampered file fails `check`: a transformer weight with a wrong shape.
    tt, _ = load_canonical(out)
    tt["cfm.estimator.transformer.layers.0.attention.q.weight"] = torch.zeros(3, 16)
    bad = rewrite(str(out), str(tmp_path / "bad.safetensors"), tensors=tt)
    assert schema.check_file(bad)[1]


def test_demo_release_is_small_and_converts(tmp_path):
    rel = tmp_path / "demo"
    rel.mkdir()
    cfg = up.demo_config()
    up.write_demo(str(rel), cfg)
    size = os.path.getsize(rel / "s2mel.pth")
    assert size < 1.5e6, size
    import yaml

    with open(rel / "config.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    out = tmp_path / "d.safetensors"
    run_cli("s2mel", rel, out, "--quiet")
    assert schema.check_file(str(out))[1] == []


def _respell(flat: dict, how: str) -> None:
    for n in [n for n in flat if n.endswith(".weight_g")]:
        mod = n[: -len(".weight_g")]
        g, v = flat.pop(f"{mod}.weight_g"), flat.pop(f"{mod}.weight_v")
        if how == "parametrizations":  # torch.nn.utils.parametrizations.weight_norm
            flat[f"{mod}.parametrizations.weight.original0"] = g
            flat[f"{mod}.parametrizations.weight.original1"] = v
        else:  # weight norm already removed before saving
            flat[f"{mod}.weight"] = torch._weight_norm(v, g, 0).contiguous()


@pytest.mark.parametrize("how", ["parametrizations", "prefolded"])
def test_weight_norm_spellings(tiny, tmp_path, how):
    rel = _flat_dump(tmp_path, tiny["m"], lambda f: _respell(f, how))
    out = tmp_path / "o.safetensors"
    run_cli("s2mel", rel, out, "--quiet")
    a, b = load_file(tiny["pth"]), load_file(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
