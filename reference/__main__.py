"""``python -m reference synthesize BUNDLE_DIR --text TEXT --prompt PROMPT.wav --out OUT.wav [--lang LANG]``

Speech from a converted bundle with the reference pipeline (:mod:`reference.pipeline`).
An IndexTTS-2.5 bundle needs ``--lang`` (the text's language, e.g. en, zh, es); a 2.0
bundle refuses it.  Writes a 22.05 kHz (the bundle's output rate) 16-bit mono WAV;
``--trace`` also writes every intermediate as safetensors.  Bad input gets one
``error:`` line, exit status 1, and no output file.

Decoding: by default the GPT's codes are drawn as upstream draws them, beam sampling
with the manifest's ``num_beams`` (3), top-k, top-p, temperature and repetition
penalty, seeded by ``--seed``.  ``--greedy`` is greedy search with one beam
(deterministic; ``--seed`` then only seeds the CFM noise).  ``--beams N`` sets the
number of beams in either mode: ``--beams 1`` is one-beam sampling, ``--greedy
--beams 3`` beam search without sampling.

Text: split into segments as upstream splits it (at most ``--segment-tokens``, default
the manifest's 120, per segment), each synthesised alone and joined with the manifest's
``interval_silence_ms`` (200 ms) of silence.
"""

from __future__ import annotations

import argparse
import sys
import time


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {s!r}") from None


def _beams(s: str) -> int:  # also --segment-tokens: a whole number of at least 1
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {s!r}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference", description=__doc__.split("\n\n")[1].strip())
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthesize", help="text and a voice prompt to a WAV, from the bundle alone")
    s.add_argument("bundle", metavar="BUNDLE_DIR", help="a folder written by `convert.py all`")
    s.add_argument("--text", required=True, help="the text to speak (not normalised: write numbers as words)")
    s.add_argument("--prompt", required=True, metavar="WAV", help="the voice prompt (a WAV file)")
    s.add_argument("--out", required=True, metavar="WAV", help="the WAV file to write")
    s.add_argument("--emotion-prompt", metavar="WAV", help="an emotion reference (a WAV file)")
    s.add_argument("--emotion-alpha", type=float, default=1.0, metavar="A", help="emotion strength (default 1.0)")
    s.add_argument("--emotion-vector", type=_floats, metavar="W1,...",
                   help="one weight per emotion (happy, angry, sad, afraid, disgusted, melancholic, surprised, calm)")
    s.add_argument("--raw-emotion-vector", action="store_true",
                   help="use --emotion-vector as given, without normalize_emo_vec's bias and 0.8 cap "
                        "(IndexTTS-2.0; a 2.5 bundle always uses it as given: 2.5 has no normalize_emo_vec)")
    s.add_argument("--lang", help="the text's language, e.g. en, zh, es (IndexTTS-2.5 bundles: required; 2.0: refused)")
    s.add_argument("--max-codes", type=int, metavar="N", help="at most N GPT codes (default: the manifest's max_mel_tokens)")
    s.add_argument("--greedy", action="store_true",
                   help="greedy decoding (one beam unless --beams) instead of seeded beam sampling")
    s.add_argument("--beams", type=_beams, metavar="N",
                   help="beams of the code generation (default: 1 with --greedy, else the manifest's num_beams, 3)")
    s.add_argument("--segment-tokens", type=_beams, metavar="N",
                   help="at most N text tokens per segment (upstream's max_text_tokens_per_segment; default: the "
                        "manifest's, 120): a longer text is split into segments joined with 200 ms of silence")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the CFM noise (default 0)")
    s.add_argument("--trace", metavar="TRACE.safetensors", help="also write every intermediate here")
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from . import pipeline, trace
    from .load import LoadError

    shown = sys.stderr.isatty()
    t0 = time.perf_counter()

    def progress(step: str) -> None:
        if shown:
            print(f"  {time.perf_counter() - t0:7.2f} s  {step}", file=sys.stderr, flush=True)

    try:
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise pipeline.PipelineError("--device cuda: this torch has no CUDA device")
        b = pipeline.open_bundle(args.bundle, args.device)
        r = pipeline.synthesize(b, args.text, args.prompt, lang=args.lang, emotion_prompt=args.emotion_prompt,
                                emotion_alpha=args.emotion_alpha, emotion_vector=args.emotion_vector,
                                normalize_emotion=not args.raw_emotion_vector, max_codes=args.max_codes,
                                greedy=args.greedy, seed=args.seed, num_beams=args.beams,
                                max_segment_tokens=args.segment_tokens, progress=progress)
        trace.save_wav(args.out, r.wav, r.sample_rate)
        if args.trace:
            trace.save_trace(args.trace, r.trace, pipeline.trace_metadata(b, r))
    except (pipeline.PipelineError, LoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    codes = sum(v.shape[1] for k, v in r.trace.items() if k.split("@")[0] == "codes.codes")
    segments = r.options["segments"]
    print(f"wrote {args.out}: {r.wav.shape[-1] / r.sample_rate:.2f} s at {r.sample_rate} Hz from {codes} codes "
          f"{'in one segment' if segments == 1 else f'in {segments} segments'} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
