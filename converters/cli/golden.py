"""Golden activations: ``convert.py golden OUT_DIR`` and their check.

For every canonical file in ``OUT_DIR`` the reference runtime (``reference/``) runs each
entry point of that model on seeded, deterministic, short inputs, and
``OUT_DIR/golden/<canonical file name>`` receives, as float32 (inputs that are ids or
lengths as int64):

- ``input.<entry>.<arg>``: the inputs, in the entry's argument order (metadata ``entries``)
- ``output.<entry>.<name>``: what the entry point returns
- ``act.<entry>.<stack>.<i>``: the activation after every block or layer

A port loads the canonical weights, feeds the ``input.*`` tensors to its own
implementation, and compares its layers with ``act.*`` and its results with
``output.*``.  The metadata names the canonical file and its sha256 (so ``check`` can
tell that a golden file belongs to the canonical file beside it), the entry points with
their upstream counterparts, the seed and the reference version.

The check (:func:`check_golden`) is torch-free; generation (:func:`write_golden`)
imports torch and the reference runtime.
"""

from __future__ import annotations

import json
import os
import time

from ..errors import ConvertError

GOLDEN_SCHEMA = "indextts2-golden"
GOLDEN_VERSION = "1"
FOLDER = "golden"
REQUIRED = ("schema", "golden_version", "model", "canonical_file", "canonical_sha256", "canonical_schema_version",
            "reference_version", "seed", "dtype", "entries")


def canonical_files(out_dir: str) -> list[str]:
    return sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir)
                  if n.endswith(".safetensors") and os.path.isfile(os.path.join(out_dir, n)))


def tensor_names(entries: list[dict]) -> list[str]:
    """Every tensor a golden file with these entries holds."""
    names = []
    for e in entries:
        names += [f"input.{e['name']}.{a}" for a in e["args"]]
        names += [f"output.{e['name']}.{o}" for o in e["outputs"]]
        names += [f"act.{e['name']}.{a}" for a in e["acts"]]
    return names


# ------------------------------------------------------------------ writing


def golden_for(path: str, seed: int):
    """(tensors, entries) of the golden file for one canonical file."""
    import torch

    from reference.entry import entries_for
    from reference.load import load

    w = load(path, device="cpu").float()
    tensors: dict[str, torch.Tensor] = {}
    index = []
    for e in entries_for(w):
        g = torch.Generator().manual_seed(seed)
        inputs = e.inputs(w.config, g)
        if list(inputs) != list(e.args):
            raise ConvertError(f"{path}: reference entry {e.name!r} made inputs {list(inputs)}, declared {list(e.args)} (reference bug)")
        acts: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            outs = e.run(w, acts, **inputs)
        if list(outs) != list(e.outputs):
            raise ConvertError(f"{path}: reference entry {e.name!r} returned {list(outs)}, declared {list(e.outputs)} (reference bug)")
        for kind, group in (("input", inputs), ("output", outs), ("act", acts)):
            for k, t in group.items():
                t = t.detach().cpu()
                tensors[f"{kind}.{e.name}.{k}"] = (t.float() if t.is_floating_point() else t.long()).contiguous()
        index.append({"name": e.name, "upstream": e.upstream, "args": list(e.args), "outputs": list(e.outputs),
                      "acts": list(acts)})
    return w, tensors, index


def write_golden(out_dir: str, models: tuple[str, ...] = (), seed: int = 0, echo=print) -> list[str]:
    """Write ``OUT_DIR/golden/<file>`` for every canonical file (or those of ``models``)."""
    from reference import REFERENCE_VERSION

    from ..format import schema
    from ..io import safetensors_io as stio
    from ..io.hashing import SERVICE as HASHES
    from ..format.st_header import read_header

    if not os.path.isdir(out_dir):
        raise ConvertError(f"{out_dir}: no such folder (give the folder `convert.py all` wrote)")
    todo = []
    for p in canonical_files(out_dir):
        md = read_header(p).metadata
        if md.get("schema") != schema.SCHEMA_NAME:
            continue
        if not models or md.get("model") in models:
            todo.append((p, md))
    missing = sorted(set(models) - {md.get("model") for _, md in todo})
    if missing:
        raise ConvertError(f"{out_dir}: no canonical file for {', '.join(missing)}")
    if not todo:
        raise ConvertError(f"{out_dir}: no canonical files in this folder")
    HASHES.prefetch([p for p, _ in todo])
    gdir = os.path.join(out_dir, FOLDER)
    os.makedirs(gdir, exist_ok=True)
    written = []
    for p, md in todo:  # one file at a time: memory stays at one model
        t0 = time.perf_counter()
        _, tensors, index = golden_for(p, seed)
        meta = {
            "schema": GOLDEN_SCHEMA,
            "golden_version": GOLDEN_VERSION,
            "model": md["model"],
            "canonical_file": os.path.basename(p),
            "canonical_sha256": HASHES.digest(p),
            "canonical_schema_version": md.get("schema_version", ""),
            "family_version": md.get("family_version", "2.0"),
            "reference_version": REFERENCE_VERSION,
            "seed": str(seed),
            "dtype": "F32",
            "entries": json.dumps(index, sort_keys=True, separators=(",", ":")),
        }
        out = os.path.join(gdir, os.path.basename(p))
        outs = [stio.OutTensor(n, stio.st_dtype(t.dtype, n), tuple(t.shape), (lambda t=t: t)) for n, t in tensors.items()]
        stio.write_stream(out, outs, meta)
        errs = check_golden(out)
        if errs:
            raise ConvertError("written golden file fails its check (bug):\n  " + "\n  ".join(errs))
        written.append(out)
        echo(f"wrote {out} ({md['model']}: {len(index)} entry points, {len(tensors)} tensors, {time.perf_counter() - t0:.1f} s)")
    if not models:
        trace = write_pipeline_trace(out_dir, seed, echo)
        if trace:
            written.append(trace)
    return written


# ------------------------------------------------------------------ the end-to-end trace

PIPELINE_FILE = "pipeline.safetensors"
TRACE_SCHEMA = "indextts2-pipeline-trace"  # reference.pipeline.TRACE_SCHEMA
TRACE_TEXT = "CAB BAD DAB FACE"
TRACE_PROMPT_S = 1.6
TRACE_MAX_CODES = 12
TRACE_REQUIRED = ("schema", "family_version", "reference_version", "options", "steps", "files_sha256", "sample_rate",
                  "prompt_sample_rate")


def trace_prompt(seconds: float, sr: int, seed: int):
    """The trace's voice prompt: a seeded speech-like signal (harmonics of a gliding f0
    under a syllable envelope, a little noise), float32 ``[1, n]`` in [-1, 1]."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    f0 = 120 + 40 * rng.random() + 25 * np.sin(2 * np.pi * (1 + rng.random()) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 9)) * (0.4 + 0.6 * np.sin(2 * np.pi * 2.5 * t) ** 2)
    x = 0.4 * x / np.abs(x).max() + 0.01 * rng.standard_normal(t.shape[0])
    return torch.tensor(np.clip(x, -1, 1), dtype=torch.float32).unsqueeze(0)


def write_pipeline_trace(out_dir: str, seed: int = 0, echo=print) -> str | None:
    """``OUT_DIR/golden/pipeline.safetensors``: the reference pipeline end to end on a
    seeded prompt and a fixed text, greedy, at most TRACE_MAX_CODES codes, with the CFM
    noise from ``seed``: ``input.prompt_audio``, every intermediate under the manifest's
    step names, the waveform.  A bundle whose files do not chain end to end gets none
    (said so)."""
    from reference import pipeline
    from reference.trace import save_trace

    try:
        b = pipeline.open_bundle(out_dir, "cpu")
    except pipeline.PipelineError as e:
        echo(f"no {FOLDER}/{PIPELINE_FILE}: {e}")
        return None
    t0 = time.perf_counter()
    sr = b.pipeline["front_ends"]["resampling"]["prompt_load"]["speaker_prompt_hz"]
    prompt = trace_prompt(TRACE_PROMPT_S, sr, seed)
    r = pipeline.synthesize(b, TRACE_TEXT, (prompt, sr), max_codes=TRACE_MAX_CODES, greedy=True, seed=seed)
    meta = pipeline.trace_metadata(b, r)
    meta["prompt_sample_rate"] = str(sr)
    out = os.path.join(out_dir, FOLDER, PIPELINE_FILE)
    save_trace(out, {"input.prompt_audio": prompt, **r.trace}, meta)
    errs = check_pipeline_trace(out)
    if errs:
        raise ConvertError("written pipeline trace fails its check (bug):\n  " + "\n  ".join(errs))
    echo(f"wrote {out} (end to end: {r.trace['codes.codes'].shape[1]} codes, {len(r.trace)} intermediates, "
         f"{time.perf_counter() - t0:.1f} s)")
    return out


def is_pipeline_trace(metadata: dict) -> bool:
    return metadata.get("schema") == TRACE_SCHEMA


def check_pipeline_trace(path: str) -> list[str]:
    """Problems with an end-to-end trace (torch-free): its metadata, a tensor for every
    step it lists, and the sha256 of every bundle file it was made from equal to what
    the manifest beside its folder records now."""
    from ..release.release import read_manifest
    from ..format.st_header import read_header

    try:
        h = read_header(path)
    except ConvertError as e:
        return [str(e)]
    md = h.metadata
    errs = [f"{path}: metadata has no {k!r}" for k in TRACE_REQUIRED if k not in md]
    if errs:
        return errs
    try:
        steps, used, options = json.loads(md["steps"]), json.loads(md["files_sha256"]), json.loads(md["options"])
    except ValueError:
        return [f"{path}: metadata 'steps', 'files_sha256' or 'options' is not JSON"]
    if not isinstance(options, dict) or not steps or steps[-1] != "waveform.wav":
        errs.append(f"{path}: metadata 'steps' must end with 'waveform.wav' and 'options' be an object")
    names = set(h.tensors)
    for n in steps:
        if n not in names:
            errs.append(f"{path}: step {n!r} has no tensor")
    for n in sorted(names - set(steps) - {"input.prompt_audio"}):
        errs.append(f"{path}: unexpected tensor {n!r}")
    if "input.prompt_audio" not in names:
        errs.append(f"{path}: no 'input.prompt_audio' tensor")
    bundle = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    try:
        m = read_manifest(bundle) or {}
    except ConvertError as e:
        return errs + [str(e)]
    known = {n: r.get("sha256") for n, r in m.get("files", {}).items()}
    for entry in m.get("bundle", {}).values():
        known.update({n: r.get("sha256") for n, r in entry.get("files", {}).items()})
    for name, sha in sorted(used.items()):
        if name not in known:
            errs.append(f"{path}: made from {name}, which manifest.json beside it does not list")
        elif known[name] != sha:
            errs.append(f"{path}: made from another {name} (sha256 {sha[:12]}..., the bundle's is "
                        f"{str(known[name])[:12]}...); run `convert.py golden` again")
    return errs


# ------------------------------------------------------------------ checking (torch-free)


def is_golden(metadata: dict) -> bool:
    return metadata.get("schema") == GOLDEN_SCHEMA


def check_golden(path: str, full_hash: bool = False) -> list[str]:
    """Problems with one golden file: its structure, and whether it belongs to the
    canonical file beside its folder (the sha256 the manifest records for that file, or,
    without a manifest entry or with ``full_hash``, the file's own sha256)."""
    from ..io.hashing import sha256_file
    from ..release.release import read_manifest
    from ..format.st_header import read_header

    try:
        h = read_header(path)
    except ConvertError as e:
        return [str(e)]
    md = h.metadata
    if not is_golden(md):
        return [f"{path}: not a golden file (no {GOLDEN_SCHEMA} schema metadata)"]
    errs = [f"{path}: metadata has no {k!r}" for k in REQUIRED if k not in md]
    if errs:
        return errs
    if md["golden_version"] != GOLDEN_VERSION:
        return [f"{path}: golden version {md['golden_version']}, this tool reads version {GOLDEN_VERSION}; run `convert.py golden` again"]
    try:
        index = json.loads(md["entries"])
        names = tensor_names(index)
    except (ValueError, KeyError, TypeError):
        return [f"{path}: metadata 'entries' is malformed"]
    for n in sorted(set(names) - set(h.tensors)):
        errs.append(f"{path}: missing tensor {n!r}")
    for n in sorted(set(h.tensors) - set(names)):
        errs.append(f"{path}: unexpected tensor {n!r}")
    for n, info in sorted(h.tensors.items()):
        if info.dtype not in ("F32", "I64"):
            errs.append(f"{path}: tensor {n!r} is {info.dtype}; golden tensors are F32 or I64")
    canonical = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), md["canonical_file"])
    if not os.path.isfile(canonical):
        errs.append(f"{path}: belongs to {md['canonical_file']}, which is not beside the golden folder ({canonical})")
        return errs
    try:
        cmd = read_header(canonical).metadata
    except ConvertError as e:
        return errs + [str(e)]
    if cmd.get("model") != md["model"]:
        errs.append(f"{path}: golden for model {md['model']!r}, but {canonical} holds {cmd.get('model')!r}")
    digest = None
    if not full_hash:
        try:
            m = read_manifest(os.path.dirname(canonical))
        except ConvertError:
            m = None
        entry = (m or {}).get("files", {}).get(md["canonical_file"])
        if entry and entry.get("size") == os.path.getsize(canonical):
            digest = entry.get("sha256")
    if digest is None:
        digest = sha256_file(canonical)
    if digest != md["canonical_sha256"]:
        errs.append(f"{path}: computed from another {md['canonical_file']} (sha256 {md['canonical_sha256'][:12]}..., "
                    f"the file beside it is {digest[:12]}...); run `convert.py golden` again")
    return errs
