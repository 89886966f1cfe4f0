"""Precision of half-precision canonical files (issue 15): the reference forward of every
entry point on float16 and bfloat16 conversions against the float32 conversion of the same
release (all computed in float32).

    python -m bench.precision   # after convert.py all --dtype float32|float16|bfloat16 into
                                # bench-cache/canon-<dtype> (the synthetic full-size release)

Prints one JSON row per output: max |float32 output|, and the max abs difference of each
half conversion (integer outputs: how many elements differ).
"""
import json
import sys

sys.path.insert(0, '.')
import torch
from reference.entry import entries
from reference.load import load

torch.set_num_threads(2)
rows = []
base = 'bench-cache/canon-float32'
for name in ['gpt', 's2mel', 'w2v_bert', 'bigvgan', 'campplus', 'semantic_codec', 'speaker_matrix', 'emotion_matrix']:
    ref = load(f'{base}/{name}.safetensors', device='cpu').float()
    halves = {dt: load(f'bench-cache/canon-{dt}/{name}.safetensors', device='cpu').float() for dt in ('float16', 'bfloat16')}
    for e in entries(ref.model):
        x = e.inputs(ref.config, torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = e.run(ref, None, **x)
            got = {dt: e.run(w, None, **x) for dt, w in halves.items()}
        for o in e.outputs:
            a = want[o]
            r = {"model": ref.model, "entry": e.name, "output": o, "max_abs": float(a.abs().max()) if a.is_floating_point() else None}
            for dt in halves:
                b = got[dt][o]
                if a.is_floating_point():
                    r[dt] = float((a - b).abs().max())
                else:
                    r[dt] = f"{int((a != b).sum())} of {a.numel()} differ"
            rows.append(r); print(json.dumps(r), flush=True)
    del ref, halves
