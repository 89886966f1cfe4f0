"""w2v-bert's upstream adapter: transformers' ``Wav2Vec2BertModel`` as
``maskgct_utils.build_semantic_model`` builds it, and ``IndexTTS2.get_emb``."""

from __future__ import annotations

import ast
import functools
import os
import sys
import types

from ...errors import ConvertError
from .common import indextts, need, quiet, repcodec_module


@functools.cache
def upstream_get_emb():
    """``IndexTTS2.get_emb``, compiled from the source of upstream's infer_v2.py alone:
    importing that module would drag in the whole inference stack."""
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
    """``maskgct_utils.build_semantic_model(stats_path)``, its hard-coded hub name
    ("facebook/w2v-bert-2.0") redirected to the local folder: ``from_pretrained``, eval,
    and ``mean`` / ``sqrt(var)`` from the .pt file.  The result holds what ``get_emb``
    reads."""
    tf = need("transformers", "w2v-bert (transformers)")
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
        with quiet():
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
    """``hidden_states``: transformers' hidden states, stacked.  In a file of profile
    ``indextts2`` (17 layers, the statistics folded into the last) the reference's last
    state is the normalised feature, so the comparison takes upstream's first 17 states
    followed by ``get_emb``."""
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


def imports() -> None:
    need("transformers", "w2v-bert (transformers)")
    need("safetensors.torch", "safetensors")
    repcodec_module()
    indextts("utils.maskgct_utils")


def load(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    """from_pretrained reads a folder: the model must be its model.safetensors, the
    config the config.json beside it, the statistics a torch .pt file."""
    if os.path.basename(src_file) != "model.safetensors":
        raise ConvertError(f"{src_file}: upstream (transformers from_pretrained) reads model.safetensors in a folder")
    if os.path.abspath(cfg_file) != os.path.join(os.path.dirname(os.path.abspath(src_file)), "config.json"):
        raise ConvertError(f"{cfg_file}: upstream (transformers from_pretrained) reads the config.json beside the model")
    if not extra.get("stats/", "").endswith(".pt"):
        raise ConvertError(f"{extra.get('stats/')}: upstream's build_semantic_model reads a torch .pt statistics file")
    return w2v_bert_model(os.path.dirname(os.path.abspath(src_file)), extra["stats/"]), \
        "maskgct_utils.build_semantic_model (Wav2Vec2BertModel.from_pretrained on the folder) + IndexTTS2.get_emb"
