"""Speech from the bundle, measured: the reference pipeline (``reference.pipeline``) end
to end on a converted bundle, in a fresh process per run.

    python -m bench.e2e BUNDLE_DIR [--device cpu|cuda] [--max-codes 30] [--runs 1]

Each run reports the wall time of every stage (as the pipeline's ``progress`` callback
marks them), the time from process start to the first audio (the waveform in memory),
the real-time factor (synthesis time / audio length) and the peak resident memory
(``ru_maxrss``; memory-mapped weight pages count in it).  The prompt is a seeded
speech-like signal of 2 s at 22.05 kHz, the text short, decoding greedy.
``make bench`` runs it on the full-size synthetic release of either version (``bench.run``; 2.5 with ``lang="en"``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import wave

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "hello world"


def write_prompt(path: str, seconds: float = 2.0, sr: int = 22050) -> str:
    """A voiced, speech-like 16-bit WAV: harmonics of a gliding f0 under a syllable envelope."""
    import numpy as np

    t = np.arange(int(sr * seconds)) / sr
    phase = 2 * math.pi * np.cumsum(140 + 30 * np.sin(2 * math.pi * 1.5 * t)) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * math.pi * 3 * t) ** 2)
    x = 0.3 * x / np.abs(x).max() + 0.01 * np.random.default_rng(0).standard_normal(t.shape[0])
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def child(bundle: str, prompt: str, device: str, max_codes: int, started: float) -> dict:
    import resource

    sys.path.insert(0, ROOT)
    import torch

    from reference import pipeline

    marks: list[tuple[str, float]] = []
    t_open = time.perf_counter()
    b = pipeline.open_bundle(bundle, device)
    if device == "cuda":
        torch.cuda.synchronize()
    opened = time.perf_counter()

    def progress(step: str) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append((step, time.perf_counter()))

    lang = "en" if b.version == "2.5" else None  # 2.5 bundles need a language
    r = pipeline.synthesize(b, TEXT, prompt, max_codes=max_codes, greedy=True, seed=0, progress=progress, lang=lang)
    if device == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [done]
    stages = {step: round(end - t, 3) for (step, t), end in zip(marks, ends)}
    audio_s = r.wav.shape[-1] / r.sample_rate
    return {"device": device, "family_version": b.version, "max_codes": max_codes, "codes": int(r.trace["codes.codes"].shape[1]),
            "audio_s": round(audio_s, 3), "load_s": round(opened - t_open, 3), "stages_s": stages,
            "synthesis_s": round(done - opened, 3), "rtf": round((done - opened) / audio_s, 2),
            "process_start_to_audio_s": round(time.time() - started, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "torch_threads": torch.get_num_threads()}


def measure(bundle: str, device: str = "cpu", max_codes: int = 30, runs: int = 1, log=print) -> dict:
    """``runs`` fresh-process runs; each run's figures, and the median synthesis time."""
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        prompt = write_prompt(os.path.join(tmp, "prompt.wav"))
        for i in range(runs):
            log(f"e2e: {device} run {i + 1}/{runs} ({max_codes} codes at most)")
            p = subprocess.run([sys.executable, "-m", "bench.e2e", "--child", bundle, "--prompt", prompt,
                                "--device", device, "--max-codes", str(max_codes), "--started", repr(time.time())],
                               cwd=ROOT, check=True, capture_output=True, text=True)
            out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    times = sorted(r["synthesis_s"] for r in out)
    return {"runs": out, "median_synthesis_s": times[len(times) // 2]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-codes", type=int, default=30)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    ap.add_argument("--started", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.bundle, a.prompt, a.device, a.max_codes, a.started)))
        return
    print(json.dumps(measure(a.bundle, a.device, a.max_codes, a.runs, lambda m: print(m, file=sys.stderr)), indent=2))


if __name__ == "__main__":
    main()
