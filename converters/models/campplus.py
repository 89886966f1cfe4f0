"""CAMPPlus speaker encoder (``funasr/campplus``, ``campplus_cn_common.bin``)
-> ``campplus.safetensors``.

Source: ``campplus_cn_common.bin``, a torch pickle of a plain state dict, from the
Hugging Face cache.  Upstream class: ``indextts.s2mel.modules.campplus.DTDNN.CAMPPlus``,
which IndexTTS-2 builds as ``CAMPPlus(feat_dim=80, embedding_size=192)`` (hard-coded in
``infer_v2.py``; no config file) and runs in eval mode on 80-bin Kaldi fbank features
``[B, T, 80]`` (mean-normalised over time), giving the style vector ``[B, 192]``.

Hyperparameters: IndexTTS-2's values unless ``--config`` (or a ``campplus.json`` beside
the source; no upstream file has that name, it is this converter's) names a JSON object
with any of CAMPPlus's constructor arguments (``feat_dim``, ``embedding_size``, ``growth_rate``,
``bn_size``, ``init_channels``, ``config_str``); the rest of the architecture is fixed in
the class and written to the metadata for the runtime.

Batch norms (eval mode: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``,
eps 1e-5) are folded into the bias-free convolution right before them wherever there is
one, which is exact (``fold_bn_weight`` / ``fold_bn_bias`` in :mod:`ops`); the folded
conv gains a ``.bias``:
- head (FCM): ``conv1``+``bn1``, every ``BasicResBlock``'s ``conv1``+``bn1``,
  ``conv2``+``bn2`` and ``shortcut.0``+``shortcut.1``, and ``conv2``+``bn2``
- ``xvector.tdnn``: ``linear`` + ``nonlinear.batchnorm``
- each dense layer's ``linear1`` + ``nonlinear2.batchnorm``
- the last transit layer's ``linear`` + ``xvector.out_nonlinear.batchnorm`` (only the
  ReLU of ``out_nonlinear`` remains)
- ``xvector.dense.linear`` + its ``affine=False`` batch norm (``fold_bn_*_noaffine``)

Carried as canonical tensors (``weight``, ``bias``, ``running_mean``, ``running_var``):
each dense layer's ``nonlinear1.batchnorm`` and each transit layer's
``nonlinear.batchnorm``.  They normalise the concatenated dense-block features, which
no single convolution produced, and a ReLU separates them from the conv after them, so
no exact fold exists.

Dropped: every ``num_batches_tracked`` (a training counter; eval mode never reads it).
"""

from __future__ import annotations

from ..io.configs import load_json
from ..errors import ConvertError
from ..format.table import Drop, row

# IndexTTS-2 hard-codes the hyperparameters: the config is optional (a JSON file of
# constructor arguments, --config or campplus.json beside the source).

# What IndexTTS-2 passes, and CAMPPlus's own defaults for the rest.
INDEXTTS2_ARGS = {"feat_dim": 80, "embedding_size": 192}
CLASS_DEFAULTS = {"growth_rate": 32, "bn_size": 4, "init_channels": 128, "config_str": "batchnorm-relu"}
# Fixed inside the upstream classes (DTDNN.py, layers.py).
M_CHANNELS = 32
HEAD_NUM_BLOCKS = [2, 2]
HEAD_FREQ_STRIDES = [2, 2]  # FCM._make_layer(..., stride=2) per stage: the first block strides (2, 1)
HEAD_CONV2_FREQ_STRIDE = 2  # FCM.conv2: stride (2, 1)
BLOCK_LAYERS = [12, 24, 16]
BLOCK_KERNEL_SIZES = [3, 3, 3]
BLOCK_DILATIONS = [1, 2, 2]
BN_EPS = 1e-5
EPS = f"eps={BN_EPS}"

DROPS: list[Drop] = [
    Drop(r".*\.num_batches_tracked",
         "BatchNorm training counter (only used for cumulative-average momentum in training); eval mode never reads it"),
]


def load_config(path: str | None) -> dict:
    if path is None:
        return dict(INDEXTTS2_ARGS)
    return load_json(path)


def runtime_config(raw: dict, path: str | None) -> dict:
    where = path or "CAMPPlus"
    unknown = sorted(set(raw) - set(INDEXTTS2_ARGS) - set(CLASS_DEFAULTS))
    if unknown:
        raise ConvertError(f"{where}: unknown CAMPPlus arguments {unknown}; known: {sorted({**INDEXTTS2_ARGS, **CLASS_DEFAULTS})}")
    args = {**CLASS_DEFAULTS, **INDEXTTS2_ARGS, **raw}
    for k in ("feat_dim", "embedding_size", "growth_rate", "bn_size", "init_channels"):
        v = args[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConvertError(f"{where}: CAMPPlus {k} is {v!r}, expected a positive int")
    if args["config_str"] != "batchnorm-relu":
        raise ConvertError(f"{where}: CAMPPlus config_str {args['config_str']!r} is not supported (IndexTTS-2 uses 'batchnorm-relu')")
    if args["feat_dim"] % 8:
        raise ConvertError(f"{where}: CAMPPlus feat_dim {args['feat_dim']} is not a multiple of 8 (the head halves it three times)")
    g = args["growth_rate"]
    block_in, transit_in = [], []
    c = args["init_channels"]
    for n in BLOCK_LAYERS:
        block_in.append(c)
        transit_in.append(c + n * g)
        c = (c + n * g) // 2
    return {
        "feat_dim": args["feat_dim"],
        "embedding_size": args["embedding_size"],
        "growth_rate": g,
        "bn_size": args["bn_size"],
        "bn_channels": args["bn_size"] * g,
        "init_channels": args["init_channels"],
        "m_channels": M_CHANNELS,
        "head_num_blocks": HEAD_NUM_BLOCKS,
        "head_freq_strides": HEAD_FREQ_STRIDES,
        "head_conv2_freq_stride": HEAD_CONV2_FREQ_STRIDE,
        "head_out_channels": M_CHANNELS * (args["feat_dim"] // 8),
        "tdnn_kernel_size": 5,
        "tdnn_stride": 2,
        "block_layers": BLOCK_LAYERS,
        "block_kernel_sizes": BLOCK_KERNEL_SIZES,
        "block_dilations": BLOCK_DILATIONS,
        "block_in_channels": block_in,
        "transit_in_channels": transit_in,
        "out_channels": c,
        "cam_reduction": 2,
        "cam_seg_len": 100,
        "bn_eps": BN_EPS,
        "nonlinearity": "relu",
        "stats_pool": "concat(mean over time, unbiased std over time)",
    }


def _fold(conv: str, bn: str, canon: str | None = None) -> list:
    """conv (bias-free) followed by an affine batch norm -> conv weight and bias."""
    canon = canon or conv
    return [
        row(f"{canon}.weight", f"fold_bn_weight({EPS})", f"{conv}.weight", f"{bn}.weight", f"{bn}.running_var"),
        row(f"{canon}.bias", f"fold_bn_bias({EPS})", f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"),
    ]


def _carry(bn: str) -> list:
    return [row(f"{bn}.{p}", "copy", f"{bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]


def table(cfg: dict):
    # Upstream names are 1-based (layer1, block1, tdnnd1): rows are listed out here
    # rather than templated.
    rows = _fold("head.conv1", "head.bn1")
    for s in range(1, len(cfg["head_num_blocks"]) + 1):
        for k in range(cfg["head_num_blocks"][s - 1]):
            b = f"head.layer{s}.{k}"
            rows += _fold(f"{b}.conv1", f"{b}.bn1") + _fold(f"{b}.conv2", f"{b}.bn2")
            if k == 0:  # stride 2: the shortcut is a 1x1 conv + batch norm
                rows += _fold(f"{b}.shortcut.0", f"{b}.shortcut.1")
    rows += _fold("head.conv2", "head.bn2")
    rows += _fold("xvector.tdnn.linear", "xvector.tdnn.nonlinear.batchnorm")
    nb = len(cfg["block_layers"])
    for bi in range(1, nb + 1):
        for li in range(1, cfg["block_layers"][bi - 1] + 1):
            p = f"xvector.block{bi}.tdnnd{li}"
            rows += _carry(f"{p}.nonlinear1.batchnorm")
            rows += _fold(f"{p}.linear1", f"{p}.nonlinear2.batchnorm")
            rows.append(row(f"{p}.cam_layer.linear_local.weight", "copy", f"{p}.cam_layer.linear_local.weight"))
            for lin in ("linear1", "linear2"):
                rows += [row(f"{p}.cam_layer.{lin}.{x}", "copy", f"{p}.cam_layer.{lin}.{x}") for x in ("weight", "bias")]
        t = f"xvector.transit{bi}"
        rows += _carry(f"{t}.nonlinear.batchnorm")
        if bi < nb:
            rows.append(row(f"{t}.linear.weight", "copy", f"{t}.linear.weight"))
        else:
            rows += _fold(f"{t}.linear", "xvector.out_nonlinear.batchnorm")
    bn = "xvector.dense.nonlinear.batchnorm"
    rows += [
        row("xvector.dense.linear.weight", f"fold_bn_weight_noaffine({EPS})", "xvector.dense.linear.weight", f"{bn}.running_var"),
        row("xvector.dense.linear.bias", f"fold_bn_bias_noaffine({EPS})", f"{bn}.running_mean", f"{bn}.running_var"),
    ]
    return rows, {}
