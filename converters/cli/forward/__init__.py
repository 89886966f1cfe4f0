"""``convert.py verify --forward``: the reference runtime on the canonical file against
upstream's own module built from the source, on the same inputs.

``verify`` alone proves the canonical bytes equal a recomputation from the recorded
provenance; it cannot tell whether the provenance gave each tensor the right role (a
table that swapped q and k records the swap faithfully).  This runs the model.  Each
model has a module here (:mod:`.gpt`, :mod:`.s2mel`, :mod:`.w2v_bert`, :mod:`.bigvgan`,
:mod:`.semantic_codec`, :mod:`.campplus`, :mod:`.matrices`) with, per release, three
functions: one imports the upstream code it needs, one builds upstream's module from
the source files with upstream's own loading code (never the converter's inverse ops),
and one turns a reference entry point's inputs into the upstream call and its outputs
back.  :data:`ADAPTERS` says which three serve a model of a family version.  Every
reference entry point runs on its own seeded inputs (seed 0, as ``golden``) on both
sides.

Upstream code (``indextts2-inference``, ``indextts25-inference``, ``transformers`` and
what they import) is no runtime dependency of the converter: it is imported lazily, by
:mod:`.common`, and where something is missing :class:`UpstreamMissing` names the
package and says the forward comparison was not run.  ``indextts``'s package
``__init__`` imports the whole inference stack (librosa, torchaudio, ...), so
:func:`indextts` imports the model modules without it.

Tolerance.  Both sides compute in float32, in a different order (fused vs split
projections, weight norm applied at run time vs folded), which the tests measure at a
few float32 eps of the output scale (at most 7 eps on the demo); the role swaps tried
on the demo change an output by 0.5% to 80% of it.  An output passes within ``1e-4 *
max(1, max|upstream output|)`` (BigVGAN's clamped waveform on the scale of the
``conv_post`` output it clamps, which is compared too).  A float16 or bfloat16 file
stores its 'float'-class tensors rounded to that dtype (the dtype policy keeps norms,
statistics, positional and frequency tables and snake parameters float32), so
upstream's loaded values are rounded to it too, all of them: a slightly coarser
emulation than the file, which the tolerance covers (they stay float32, computed in
float32); what still differs is where rounding meets the folds done at conversion
(weight norm, batch norm, exponentiated snake parameters): the file rounds the folded
product, upstream folds rounded factors at run time.  That is measured at under 3 eps
of the output scale (the demo, in both dtypes, and a full-size CAMPPlus), so those
files pass within ``max(1e-4, 8 * eps) * max(1, max|upstream output|)``: 0.0078 for
float16, 0.0625 for bfloat16 (coarser: a swap whose effect is smaller shows only on a
float32 conversion).  Integer outputs (codes, indices) must be equal.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable, NamedTuple

from ...errors import ConvertError
from . import bigvgan, campplus, gpt, matrices, s2mel, semantic_codec, w2v_bert
# The names callers and tests reach as ``forward.<name>``: the shared machinery and each
# model's builder and runner.
from .bigvgan import bigvgan_model, bigvgan_run  # noqa: F401
from .campplus import INFER_V2_CAMPPLUS, campplus_model, campplus_run  # noqa: F401
from .common import (INSTALL, PACKAGES, UpstreamMissing, config_section, indextts, indextts25,  # noqa: F401
                     need, repcodec_module, stand_ins)
from .gpt import gpt_2_5_model, gpt_2_5_run, gpt_model, gpt_run  # noqa: F401
from .matrices import emotion_matrix_run, matrix_model, speaker_matrix_run  # noqa: F401
from .s2mel import S2MEL_SUBMODULES, s2mel_model, s2mel_run  # noqa: F401
from .semantic_codec import (ENHANCED_CODEC_ARGS, semantic_codec_2_5_model, semantic_codec_2_5_run,  # noqa: F401
                             semantic_codec_model, semantic_codec_run)
from .w2v_bert import upstream_get_emb, w2v_bert_hidden_states, w2v_bert_model, w2v_bert_run  # noqa: F401

FP32_RTOL = 1e-4
HALF_EPS_FACTOR = 8  # measured (demo in float16 and bfloat16, full-size CAMPPlus): at most 2.8 eps


# ------------------------------------------------------------------ the adapters


class Adapter(NamedTuple):
    """How ``verify --forward`` reaches upstream for one model of one family version."""

    imports: Callable[[], None]  # import what ``load`` and ``run`` need (torch is imported first)
    load: Callable[..., tuple]  # (src file, config file or None, extra files) -> (module, how it was loaded)
    run: Callable[..., dict]  # (module, entry name, inputs, reference config) -> outputs by name


# (kind, family version) -> its adapter; a kind with no entry for a version uses 2.0's.
ADAPTERS = {
    ("gpt", "2.0"): Adapter(gpt.imports, gpt.load, gpt.gpt_run),
    ("gpt", "2.5"): Adapter(gpt.imports_2_5, gpt.load_2_5, gpt.gpt_2_5_run),
    ("s2mel", "2.0"): Adapter(s2mel.imports, s2mel.load, s2mel.s2mel_run),
    ("w2v-bert", "2.0"): Adapter(w2v_bert.imports, w2v_bert.load, w2v_bert.w2v_bert_run),
    ("bigvgan", "2.0"): Adapter(bigvgan.imports, bigvgan.load, bigvgan.bigvgan_run),
    ("semantic-codec", "2.0"): Adapter(semantic_codec.imports, semantic_codec.load, semantic_codec.semantic_codec_run),
    ("semantic-codec", "2.5"): Adapter(semantic_codec.imports_2_5, semantic_codec.load_2_5,
                                       semantic_codec.semantic_codec_2_5_run),
    ("campplus", "2.0"): Adapter(campplus.imports, campplus.load, campplus.campplus_run),
    ("speaker-matrix", "2.0"): Adapter(matrices.imports_speaker, matrices.load, matrices.speaker_matrix_run),
    ("emotion-matrix", "2.0"): Adapter(matrices.imports_emotion, matrices.load, matrices.emotion_matrix_run),
}


def adapter(kind: str, family_version: str = "2.0") -> Adapter:
    a = ADAPTERS.get((kind, family_version)) or ADAPTERS.get((kind, "2.0"))
    if a is None:
        raise ConvertError(f"no upstream forward for model {kind!r}")
    return a


def import_upstream(kind: str, family_version: str = "2.0") -> None:
    """Import the upstream code ``kind`` needs before anything is read, so that a missing
    package is what gets reported first (:class:`UpstreamMissing`)."""
    need("torch", "torch")
    adapter(kind, family_version).imports()


def build(kind: str, src_file: str, cfg_file: str | None, extra: dict[str, str], family_version: str = "2.0"):
    """Upstream's module of ``kind`` from the located source, config and extra files
    (``extra["stats/"]``: the w2v-bert statistics), and how it was loaded."""
    return adapter(kind, family_version).load(src_file, cfg_file, extra)


def run(kind: str, m, name: str, inputs: dict, config: dict | None = None, family_version: str = "2.0") -> dict:
    """Upstream's outputs for one reference entry point, under the entry's output names;
    any further key is an activation, which the reference records under that name."""
    return adapter(kind, family_version).run(m, name, inputs, config)


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
