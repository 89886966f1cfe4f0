"""A checkpoint of one release converted with the other release's config (issue 25):
the refusal names the checkpoint's release and the tensors that tell it, the config
key that disagrees and both values, before any table or schema check
(``CONFIG_DIMS`` in the model modules, ``converters/format/config_dims.py``).

What differs between the released configs: the GPT's ``number_text_tokens`` (12000 in
IndexTTS-2.0, 60509 in 2.5); nothing in ``semantic_codec:`` (the same section in both,
neither has ``downsample_scale``, whose constructor defaults differ: RepCodec's 1,
EnhancedCodec's 2).  So a codec converts with either release's config, and a codec
config refused is one whose sizes or ``downsample_scale`` do not fit the checkpoint.

The GPT checkpoints are the demo releases' gpt.pth with the vocabulary of the real
releases: upstream's UnifiedVoice sizes only ``text_embedding`` and ``text_head`` by
``number_text_tokens`` (``number_text_tokens * types + 1`` rows); each converts with its
own config (the schema check then holds every shape against it)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from tests.helpers import ROOT, assert_refused, metadata, run_cli

DEMO = {"2.0": os.path.join(ROOT, "demo", "release"), "2.5": os.path.join(ROOT, "demo", "release-2.5")}
VOCAB = {"2.0": 12000, "2.5": 60509}  # the released configs' gpt.number_text_tokens
CODEC = {"2.0": os.path.join(DEMO["2.0"], "MaskGCT", "semantic_codec", "model.safetensors"),
         "2.5": os.path.join(DEMO["2.5"], "codec.pth")}
TELLS = {"2.0": "it has conditioning_encoder.*, perceiver_encoder.* and speed_emb.*, no spk_emb_proj.* or lang_embedding.*",
         "2.5": "it has spk_emb_proj.* and lang_embedding.*, no conditioning_encoder.*, perceiver_encoder.* or speed_emb.*"}
OTHER = {"2.0": "2.5", "2.5": "2.0"}


def _config(version: str, **gpt) -> dict:
    with open(os.path.join(DEMO[version], "config.yaml")) as f:
        doc = yaml.safe_load(f)
    doc["gpt"].update(gpt)
    return doc


@pytest.fixture(scope="module")
def gpts(tmp_path_factory):
    """{version: folder with gpt.pth and config.yaml}: each demo release's GPT with its
    real release's text vocabulary."""
    out = {}
    g = torch.Generator().manual_seed(25)
    for v in ("2.0", "2.5"):
        d = tmp_path_factory.mktemp(f"gpt{v}")
        sd = torch.load(os.path.join(DEMO[v], "gpt.pth"))
        rows = VOCAB[v] + 1
        for k in ("text_embedding.weight", "text_head.weight", "text_head.bias"):
            sd[k] = torch.randn((rows, *sd[k].shape[1:]), generator=g).to(sd[k].dtype)
        torch.save(sd, d / "gpt.pth")
        with open(d / "config.yaml", "w") as f:
            yaml.safe_dump(_config(v, number_text_tokens=VOCAB[v]), f, sort_keys=False)
        out[v] = d
    return out


def test_each_gpt_converts_with_its_own_config(gpts, tmp_path):
    for v, d in gpts.items():
        out = tmp_path / f"gpt{v}.safetensors"
        run_cli("gpt", d / "gpt.pth", out, "--quiet")
        assert metadata(str(out))["family_version"] == v


@pytest.mark.parametrize("ckpt", ["2.5", "2.0"])
def test_gpt_with_the_other_releases_config(gpts, tmp_path, ckpt):
    cfg = OTHER[ckpt]
    out = tmp_path / "o.safetensors"
    p = run_cli("gpt", gpts[ckpt] / "gpt.pth", out, "--config", gpts[cfg] / "config.yaml", expect=None)
    assert_refused(
        p,
        f"gpt.pth: is an IndexTTS-{ckpt} GPT ({TELLS[ckpt]})",
        f"config.yaml: gpt.number_text_tokens = {VOCAB[cfg]} (IndexTTS-{cfg}'s) gives text_embedding.weight and "
        f"text_head.weight {VOCAB[cfg] + 1} rows (number_text_tokens * types + 1); the checkpoint's have "
        f"{VOCAB[ckpt] + 1}, which is number_text_tokens = {VOCAB[ckpt]} (IndexTTS-{ckpt}'s)",
        f"config.yaml has IndexTTS-{cfg}'s values: convert with the IndexTTS-{ckpt} release's config.yaml (--config)",
    )
    assert "schema" not in p.stderr and not out.exists()


def test_a_fine_tune_with_its_base_models_config(gpts, tmp_path):
    """Not a release mismatch: the config's value is the checkpoint's own release's, and
    the message says to use the fine-tune's config."""
    d = tmp_path / "ft"
    d.mkdir()
    sd = torch.load(gpts["2.0"] / "gpt.pth")
    for k in ("text_embedding.weight", "text_head.weight", "text_head.bias"):
        sd[k] = torch.cat([sd[k], sd[k][:100]])
    torch.save(sd, d / "gpt.pth")
    p = run_cli("gpt", d / "gpt.pth", tmp_path / "o.safetensors", "--config", gpts["2.0"] / "config.yaml", expect=None)
    assert_refused(p, "is an IndexTTS-2.0 GPT", "gpt.number_text_tokens = 12000 (IndexTTS-2.0's)",
                   "the checkpoint's have 12101, which is number_text_tokens = 12100\n",
                   "convert with the config.yaml this checkpoint was made with (--config)")


# ------------------------------------------------------------------ semantic codec


def _codec_config(tmp_path, version: str, **section) -> str:
    doc = _config(version)
    doc["semantic_codec"].update(section)
    p = tmp_path / f"config{version}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(p)


@pytest.mark.parametrize("ckpt", ["2.5", "2.0"])
def test_codec_converts_with_either_releases_config(tmp_path, ckpt):
    """The two releases' semantic_codec sections are the same: the other release's
    config gives the same bytes as the checkpoint's own."""
    outs = {}
    for cfg in ("2.0", "2.5"):
        outs[cfg] = tmp_path / f"{cfg}.safetensors"
        run_cli("semantic-codec", CODEC[ckpt], outs[cfg], "--config", os.path.join(DEMO[cfg], "config.yaml"), "--quiet")
    assert outs["2.0"].read_bytes() == outs["2.5"].read_bytes()
    assert metadata(str(outs["2.0"]))["family_version"] == ckpt


@pytest.mark.parametrize("ckpt", ["2.5", "2.0"])
def test_codec_with_a_config_of_other_sizes(tmp_path, ckpt):
    cfg = _codec_config(tmp_path, OTHER[ckpt], codebook_size=32, vocos_intermediate_dim=24)
    tells = "it has down.* and up.*" if ckpt == "2.5" else "it has no down.* or up.*"
    backbone = "decoder" if ckpt == "2.5" else "encoder"
    p = run_cli("semantic-codec", CODEC[ckpt], tmp_path / "o.safetensors", "--config", cfg, expect=None)
    assert_refused(
        p,
        f"is an IndexTTS-{ckpt} semantic codec ({tells}), and {cfg} does not fit it:",
        "semantic_codec.codebook_size = 32 gives quantizer.quantizers.0.codebook.weight 32 rows; the checkpoint's has 16",
        f"semantic_codec.vocos_intermediate_dim = 24 gives {backbone}.0.convnext.0.pwconv1.weight 24 rows; "
        "the checkpoint's has 20",
    )


def test_codec_2_5_with_repcodecs_downsample_scale(tmp_path):
    """downsample_scale 1 (RepCodec's, as IndexTTS-2.0 resolves it) for a codec with the
    resampling convs."""
    cfg = _codec_config(tmp_path, "2.0", downsample_scale=1)
    p = run_cli("semantic-codec", CODEC["2.5"], tmp_path / "o.safetensors", "--config", cfg, expect=None)
    assert_refused(p, "codec.pth: is an IndexTTS-2.5 semantic codec (it has down.* and up.*)",
                   "semantic_codec.downsample_scale is 1;", "exists only when downsample_scale > 1 (IndexTTS-2.5's is 2)")


def test_codec_2_0_with_enhancedcodecs_downsample_scale(tmp_path):
    cfg = _codec_config(tmp_path, "2.5", downsample_scale=2)
    p = run_cli("semantic-codec", CODEC["2.0"], tmp_path / "o.safetensors", "--config", cfg, expect=None)
    assert_refused(p, "model.safetensors: is an IndexTTS-2.0 semantic codec (it has no down.* or up.*)",
                   "semantic_codec.downsample_scale is 2;", "IndexTTS-2.0's MaskGCT RepCodec has none")
