"""Upstream's own inference, end to end, on a release folder, with every intermediate
recorded (issue 24): the oracle for ``reference.pipeline.synthesize``.

``run_upstream_2_0`` runs ``IndexTTS2.infer_generator`` of ``indextts2-inference`` 2.1.1
(``indextts/infer_v2.py``) and ``run_upstream_2_5`` the one of ``indextts25-inference``
0.2.0 (``indextts25/infer_v2_5.py``), each on an instance whose models were loaded from
the release folder by upstream's own loading code; nothing between the models is
re-implemented here.  The intermediates are taken by wrappers around upstream's methods
and forward hooks on its modules, keyed ``<step>.<output>`` with the step names of the
bundle manifest's flow (:func:`converters.release.pipeline.build`, ``flow_2_5``), plus the
front-end keys (``prompt.*``, ``text.*``, ``emotion_features.*``, ``mel.noise`` ...);
:data:`KEYS_2_0` / :data:`KEYS_2_5` list them.

What cannot run as released, and what stands in:

- torchaudio (2.0 only: ``infer_v2`` imports it at module level and calls
  ``torchaudio.transforms.Resample`` and ``torchaudio.compliance.kaldi.fbank``).  No
  torchaudio wheel installs beside torch 2.13 (2.11.1, the newest, pins its own torch
  and its C++ extension does not load), so the 2.11.1 wheel is unpacked ``--no-deps``
  into ``.venv/torchaudio-side`` (the Makefile) and its pure-Python
  ``compliance/kaldi.py``, ``functional/functional.py`` and ``transforms/_transforms.py``
  are imported from there with a stub ``torchaudio._extension`` (no C++ library; nothing
  the two calls reach uses it).  ``infer_v2``'s module global ``torchaudio`` is then a
  stand-in module exposing exactly ``transforms.Resample`` and ``compliance.kaldi.fbank``,
  those real classes/functions (``torchaudio.save``, only used with an output path, is
  absent: the runs pass none).  The stand-in is in ``sys.modules`` only while infer_v2
  is imported.
- librosa is the real package (librosa 0.11.0, requirements-dev.txt).
- The text normalizer (NeMo's / WeTextProcessing, not installable here): 2.0's
  ``TextTokenizer`` is built with ``normalizer=None`` (upstream's own class: text is
  still upper-cased and CJK-split, then SentencePiece-encoded); 2.5 runs with its own
  ``text_normalization=False`` switch.
- 2.0's ``QwenEmotion`` (text -> emotion vector, only for ``use_emo_text``) is not
  loaded: ``device_map="auto"`` needs accelerate.  ``qwen_emo`` is None.
- Hub downloads: infer_v2 fetches w2v-bert, the MaskGCT codec and CAMPPlus by repository
  id.  :func:`load_2_0` runs upstream's own ``_load_semantic`` and ``_load_s2mel`` with
  ``hf_hub_download``, ``SeamlessM4TFeatureExtractor.from_pretrained`` and
  ``Wav2Vec2BertModel.from_pretrained`` redirected from those ids to the release's
  folders (any other id raises).  ``BigVGAN.from_pretrained(cfg.vocoder.name)`` would
  resolve the release's relative ``bigvgan`` against the working directory, so it is
  given the folder inside the release.  2.5 needs none of this: its ``__init__`` reads
  ``hf_cache/`` and runs as released.

Decoding.  ``greedy=True`` gives deterministic codes:

- 2.0: ``infer_generator`` pops ``do_sample`` and always samples; it is called with
  ``num_beams=1, top_k=1`` (top_p 0.8, temperature 0.8, repetition_penalty 10.0 stay
  upstream's defaults).  transformers then applies, in order, the repetition penalty
  (over every id in the sequence: the ``1``s of the fake prompt ids and the start code
  too, since the mask has no padding), temperature, top-k 1 and top-p; only the
  largest penalised logit stays finite, softmax makes it probability 1 and
  ``torch.multinomial`` returns it.  So upstream's greedy is the argmax of the
  repetition-penalised logits (temperature is a positive scale: no change to an argmax;
  an exact tie of two logits would be the one random case).  ``codes.logits`` records
  the raw logits of every step so a test can check this.
- 2.5 honours ``do_sample``: ``do_sample=False, num_beams=1`` is transformers' greedy
  search, the same argmax of the penalised logits.

``max_codes`` is upstream's ``max_mel_tokens`` generation argument (``max_length =
prompt + max_codes``): at most that many codes, fewer where the stop code comes first.

The CFM noise: ``cfm.inference`` draws ``torch.randn([B, n_mels, T])``; the wrapper seeds
torch's global RNG with ``seed`` right before the call and records the tensor
(``mel.noise``), so a port can be given the same noise.  The whole run is under
``torch.no_grad()`` (infer_v2's speaker conditioning runs without it upstream; values
are the same) and torch's global RNG is also seeded with ``seed`` at the start.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
import warnings

import torch

# ------------------------------------------------------------------ trace keys

# What both releases' traces hold up to the emotion vector, and from the mel on.
_PROMPT_KEYS = (
    "prompt.audio_22k", "prompt.audio_16k",
    "semantic_features.input_features", "semantic_features.attention_mask", "semantic_features.feature",
)
_CONDITIONING_KEYS = (
    "reference_mel.ref_mel",
    "style.fbank", "style.style",
    "prompt_condition.ylens", "prompt_condition.prompt_condition",
    "emotion_features.audio_16k", "emotion_features.input_features", "emotion_features.attention_mask",
    "emotion_features.feature",
    "emotion_vector.merge_emovec", "emotion_vector.emovec",
    "speech_conditioning.conditioning",
)
_DIFFUSION_KEYS = (
    "target_condition.ylens", "target_condition.cond",
    "mel.cat_condition", "mel.x_lens", "mel.noise", "mel.mel", "mel.target",
    "waveform.bigvgan", "waveform.wav",
)
KEYS_2_0 = (
    *_PROMPT_KEYS, "semantic_codes.codes", "semantic_codes.S_ref", *_CONDITIONING_KEYS,
    "text.ids", "codes.raw", "codes.logits", "codes.codes",
    "latents.latent", "latent_projection.latent", "code_embeddings.vq2emb", "code_embeddings.S_infer",
    *_DIFFUSION_KEYS,
)
KEYS_2_5 = (
    *_PROMPT_KEYS, *_CONDITIONING_KEYS,
    "text.ids", "text.lang", "codes.raw", "codes.logits", "codes.codes",
    "code_features.S_infer",
    *_DIFFUSION_KEYS,
)
# With an explicit emotion vector: the speaker-matrix row chosen per emo_num group.
EMO_VECTOR_KEYS = ("emotion_vector.index",)

# ------------------------------------------------------------------ torchaudio stand-in

TORCHAUDIO_SIDE_ENV = "INDEXTTS_TORCHAUDIO_SIDE"


def torchaudio_side_folder() -> str:
    """Where the torchaudio 2.11.1 wheel is unpacked (``make test``: .venv/torchaudio-side)."""
    return os.environ.get(TORCHAUDIO_SIDE_ENV) or os.path.join(sys.prefix, "torchaudio-side")


_SIDE: dict = {}


def side_torchaudio() -> dict[str, types.ModuleType]:
    """torchaudio's pure-Python ``compliance.kaldi``, ``functional.functional`` and
    ``transforms._transforms`` from the side folder, imported as parts of a package
    object whose ``_extension`` is a stub (the C++ library is never loaded); every
    ``torchaudio*`` entry is taken out of ``sys.modules`` again afterwards (and what was
    there before put back), so nothing else sees this package."""
    if _SIDE:
        return _SIDE
    root = os.path.join(torchaudio_side_folder(), "torchaudio")
    if not os.path.isfile(os.path.join(root, "compliance", "kaldi.py")):
        raise ModuleNotFoundError(f"torchaudio's Python sources are not at {root}: run make test (it unpacks the "
                                  "torchaudio 2.11.1 wheel there with pip install --no-deps --target)", name="torchaudio")
    saved = {k: v for k, v in sys.modules.items() if k == "torchaudio" or k.startswith("torchaudio.")}
    for k in saved:
        del sys.modules[k]
    pkg = types.ModuleType("torchaudio")
    pkg.__path__ = [root]
    pkg.__file__ = os.path.join(root, "__init__.py")
    ext = types.ModuleType("torchaudio._extension")
    ext._IS_TORCHAUDIO_EXT_AVAILABLE = False
    ext._IS_ALIGN_AVAILABLE = False
    ext.fail_if_no_align = lambda f: f
    sys.modules["torchaudio"] = pkg
    sys.modules["torchaudio._extension"] = ext
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mods = {name: importlib.import_module(f"torchaudio.{name}")
                    for name in ("compliance.kaldi", "functional.functional", "transforms._transforms")}
    finally:
        for k in [k for k in sys.modules if k == "torchaudio" or k.startswith("torchaudio.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    _SIDE.update(mods)
    return _SIDE


def torchaudio_standin() -> types.ModuleType:
    """A module named torchaudio with exactly what infer_v2 calls: ``transforms.Resample``
    and ``compliance.kaldi.fbank``, torchaudio 2.11.1's own."""
    side = side_torchaudio()
    ta = types.ModuleType("torchaudio")
    ta.__doc__ = "stand-in (tests/upstream/e2e.py): torchaudio 2.11.1's Resample and kaldi.fbank, from the side folder"
    ta.transforms = types.SimpleNamespace(Resample=side["transforms._transforms"].Resample)
    ta.compliance = types.SimpleNamespace(kaldi=types.SimpleNamespace(fbank=side["compliance.kaldi"].fbank))
    return ta


def infer_v2():
    """``indextts.infer_v2``, imported with the torchaudio stand-in in sys.modules for
    the import only (its module global keeps it)."""
    name = "indextts.infer_v2"
    if name in sys.modules:
        return sys.modules[name]
    from converters.cli.forward import indextts, repcodec_module

    indextts("logging")  # the package object without indextts/__init__.py
    import transformers  # noqa: F401  (its first import probes for torchaudio: before the stand-in exists)
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertModel  # noqa: F401
    repcodec_module()  # RepCodec's vocos.py needs two torchaudio mel helpers at import: their own stub
    saved = sys.modules.get("torchaudio")
    sys.modules["torchaudio"] = torchaudio_standin()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    finally:
        if saved is None:
            sys.modules.pop("torchaudio", None)
        else:
            sys.modules["torchaudio"] = saved


def infer_v2_5():
    name = "indextts25.infer_v2_5"
    if name in sys.modules:
        return sys.modules[name]
    from converters.cli.forward import indextts25

    indextts25("utils.common")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


# ------------------------------------------------------------------ loading


@contextlib.contextmanager
def _hub_redirect(release_dir: str, iv2):
    """infer_v2's downloads by repository id, answered from the release folder."""
    from unittest import mock

    w2v = os.path.join(release_dir, "w2v-bert-2.0")
    files = {("amphion/MaskGCT", "semantic_codec/model.safetensors"):
             os.path.join(release_dir, "MaskGCT", "semantic_codec", "model.safetensors"),
             ("funasr/campplus", "campplus_cn_common.bin"): os.path.join(release_dir, "campplus", "campplus_cn_common.bin")}
    folders = {"facebook/w2v-bert-2.0": w2v}

    def hf_hub_download(repo_id, filename, **kw):
        if (repo_id, filename) not in files:
            raise AssertionError(f"upstream asked for {repo_id}/{filename}, which the fixture does not provide")
        return files[(repo_id, filename)]

    def local(cls):
        class Local:
            @staticmethod
            def from_pretrained(repo_id, *a, **kw):
                if repo_id not in folders:
                    raise AssertionError(f"upstream asked for {repo_id}, which the fixture does not provide")
                return cls.from_pretrained(folders[repo_id], *a, **kw)
        return Local

    mg = sys.modules["indextts.utils.maskgct_utils"]
    with mock.patch.object(iv2, "hf_hub_download", hf_hub_download), \
            mock.patch.object(iv2, "SeamlessM4TFeatureExtractor", local(iv2.SeamlessM4TFeatureExtractor)), \
            mock.patch.object(mg, "Wav2Vec2BertModel", local(mg.Wav2Vec2BertModel)):
        yield


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers.utils import logging as tl

    tl.disable_progress_bar()


def load_2_0(release_dir: str):
    """An ``IndexTTS2`` (indextts2-inference 2.1.1) with the attributes its ``__init__``
    sets, on the CPU in float32, loaded from ``release_dir`` as ``__init__`` loads them:
    upstream's ``_resolve_device``, ``_load_config``, ``_load_semantic``, ``_load_s2mel``,
    ``_load_emotion_matrices`` and ``_init_cache`` themselves; ``_load_gpt``,
    ``_load_vocoder`` and ``_load_text`` spelled out (see the module docstring for what
    differs: no QwenEmotion, the vocoder folder inside the release, no normalizer)."""
    iv2 = infer_v2()
    _quiet()
    release_dir = os.path.abspath(str(release_dir))
    tts = object.__new__(iv2.IndexTTS2)
    with warnings.catch_warnings(), torch.random.fork_rng():
        warnings.simplefilter("ignore")
        tts._resolve_device("cpu", False, None)
        tts._load_config(release_dir, None)
        tts.use_accel = False
        tts.use_torch_compile = False
        # _load_gpt, less QwenEmotion
        tts.qwen_emo = None
        tts.gpt = iv2.UnifiedVoice(**tts.cfg.gpt, use_accel=tts.use_accel)
        tts.gpt_path = os.path.join(tts.model_dir, tts.cfg.gpt_checkpoint)
        iv2.load_checkpoint(tts.gpt, tts.gpt_path)
        tts.gpt = tts.gpt.to(tts.device).eval()
        tts.gpt.post_init_gpt2_config(use_deepspeed=False, kv_cache=True, half=tts.use_fp16)
        with _hub_redirect(release_dir, iv2):
            tts._load_semantic()
            tts._load_s2mel()
        # _load_vocoder, with the folder inside the release
        tts.bigvgan = iv2.bigvgan.BigVGAN.from_pretrained(os.path.join(tts.model_dir, tts.cfg.vocoder.name),
                                                          use_cuda_kernel=tts.use_cuda_kernel)
        tts.bigvgan = tts.bigvgan.to(tts.device)
        tts.bigvgan.remove_weight_norm()
        tts.bigvgan.eval()
        # _load_text, without the NeMo normalizer
        tts.bpe_path = os.path.join(tts.model_dir, tts.cfg.dataset["bpe_model"])
        tts.normalizer = None
        tts.tokenizer = iv2.TextTokenizer(tts.bpe_path, None)
        tts._load_emotion_matrices()
        tts._init_cache()
    return tts


def load_2_5(release_dir: str):
    """indextts25's ``IndexTTS2`` built by its own ``__init__`` (CPU, float32)."""
    iv = infer_v2_5()
    _quiet()
    release_dir = os.path.abspath(str(release_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return iv.IndexTTS2(cfg_path=os.path.join(release_dir, "config.yaml"), model_dir=release_dir, device="cpu")


# ------------------------------------------------------------------ recording


class _Recorder:
    """Wrappers on instance attributes and module globals, forward hooks on modules;
    all undone by :meth:`close`."""

    def __init__(self):
        self.trace: dict[str, torch.Tensor] = {}
        self._undo = []
        self.calls: dict[str, int] = {}
        self.segment = 0  # the text segment being synthesised: keys of the second on are ``key@k``

    def put(self, key: str, value) -> None:
        if self.segment:
            key = f"{key}@{self.segment}"
        if key in self.trace:
            raise AssertionError(f"{key} recorded twice: upstream ran a step more often than one segment does")
        self.trace[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value

    def count(self, name: str) -> int:
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        return n

    def wrap(self, obj, attr: str, make):
        """obj.attr = make(original); restored on close (instance attributes are
        deleted again where the original came from the class)."""
        had = attr in vars(obj) if hasattr(obj, "__dict__") else True
        orig = getattr(obj, attr)
        setattr(obj, attr, make(orig))
        self._undo.append(lambda: setattr(obj, attr, orig) if had else delattr(obj, attr))

    def hook(self, module, fn):
        """fn(module, args, kwargs, output) after each forward."""
        self._undo.append(module.register_forward_hook(fn, with_kwargs=True).remove)

    def close(self):
        while self._undo:
            self._undo.pop()()


def _record_call(rec: _Recorder, name: str, on_call):
    """A wrapper that calls the original and hands (call index, args, kwargs, result) to on_call."""
    def make(orig):
        def wrapper(*args, **kwargs):
            out = orig(*args, **kwargs)
            on_call(rec.count(name), args, kwargs, out)
            return out
        return wrapper
    return make


def _advance(rec: _Recorder, obj, attr: str) -> None:
    """Each call of ``obj.attr`` after the first starts the next text segment
    (``rec.segment``): the first per-segment call upstream makes."""
    def make(orig):
        def wrapper(*args, **kwargs):
            if rec.count(f"segment:{attr}"):
                rec.segment += 1
            return orig(*args, **kwargs)
        return wrapper
    rec.wrap(obj, attr, make)


def _record_front_ends(rec: _Recorder, tts, target_input: bool, phases: tuple[str, str]) -> None:
    """The feature extractor and get_emb, labelled by the conditioning method they run
    in (``phases``: the speaker's and the emotion's, wrapped to set ``rec.phase``); mel_fn;
    CAMPPlus; the length regulator (inside the speaker conditioning: the prompt
    condition, else the target condition; ``target_input``: record the latter's input,
    2.0's vq2emb + latent)."""
    rec.phase = None

    def phase(step):
        def make(orig):
            def wrapper(*args, **kwargs):
                rec.phase = step
                try:
                    return orig(*args, **kwargs)
                finally:
                    rec.phase = None
            return wrapper
        return make

    rec.wrap(tts, phases[0], phase("semantic_features"))
    rec.wrap(tts, phases[1], phase("emotion_features"))

    def features(i, args, kwargs, out):
        step = rec.phase
        rec.put("prompt.audio_16k" if step == "semantic_features" else "emotion_features.audio_16k", args[0])
        rec.put(f"{step}.input_features", out["input_features"])
        rec.put(f"{step}.attention_mask", out["attention_mask"])

    rec.wrap(tts, "extract_features", _record_call(rec, "extract_features", features))
    rec.wrap(tts, "get_emb", _record_call(rec, "get_emb", lambda i, a, k, out: rec.put(f"{rec.phase}.feature", out)))

    def mel(i, args, kwargs, out):
        rec.put("prompt.audio_22k", args[0])
        rec.put("reference_mel.ref_mel", out)

    rec.wrap(tts, "mel_fn", _record_call(rec, "mel_fn", mel))

    def style(module, args, kwargs, out):
        rec.put("style.fbank", args[0])
        rec.put("style.style", out)

    rec.hook(tts.campplus_model, style)

    def regulator(module, args, kwargs, out):
        x = args[0]
        ylens = kwargs["ylens"] if "ylens" in kwargs else args[1]
        y = out[0] if isinstance(out, tuple) else out
        if rec.phase == "semantic_features":
            rec.put("prompt_condition.ylens", ylens)
            rec.put("prompt_condition.prompt_condition", y)
        else:
            if target_input:
                rec.put("code_embeddings.S_infer", x)
            rec.put("target_condition.ylens", ylens)
            rec.put("target_condition.cond", y)

    rec.hook(tts.s2mel.models["length_regulator"], regulator)


def _record_generation(rec: _Recorder, gpt) -> None:
    """merge_emovec; the raw logits of every generation step (GPT2InferenceModel's
    forward, the last position)."""
    rec.wrap(gpt, "merge_emovec", _record_call(
        rec, "merge_emovec", lambda i, a, k, out: rec.put("emotion_vector.merge_emovec", out)))
    steps: dict[int, list] = {}

    def logits(module, args, kwargs, out):
        steps.setdefault(rec.segment, []).append(out.logits[:, -1].detach().clone())

    rec.hook(gpt.inference_model, logits)
    rec.steps = steps


def _record_diffusion_and_vocoder(rec: _Recorder, tts, seed: int) -> None:
    """cfm.inference, with torch's global RNG seeded right before it and its one
    ``torch.randn`` recorded; BigVGAN's input and output."""
    cfm = tts.s2mel.models["cfm"]

    def make(orig):
        def inference(mu, x_lens, *args, **kwargs):
            rec.put("mel.cat_condition", mu)
            rec.put("mel.x_lens", x_lens)
            drawn = []
            randn = torch.randn

            def recording_randn(*a, **k):
                z = randn(*a, **k)
                drawn.append(z)
                return z

            torch.manual_seed(seed)
            torch.randn = recording_randn
            try:
                out = orig(mu, x_lens, *args, **kwargs)
            finally:
                torch.randn = randn
            if len(drawn) != 1:
                raise AssertionError(f"cfm.inference drew {len(drawn)} random tensors, expected one (the noise)")
            rec.put("mel.noise", drawn[0])
            rec.put("mel.mel", out)
            return out
        return inference

    rec.wrap(cfm, "inference", make)

    def vocoder(module, args, kwargs, out):
        rec.put("mel.target", args[0])
        rec.put("waveform.bigvgan", out)

    rec.hook(tts.bigvgan, vocoder)


def _waveforms(rec: _Recorder, gen, segments: int, trailing_silence: bool) -> None:
    """Run infer_generator (stream_return=True): it yields the clamped waveform of each
    segment and its silence tensor after it (2.0: after every segment,
    ``trailing_silence``; 2.5: between segments only); ``segments`` segments are expected.
    Each segment's waveform is ``waveform.wav`` (``@k``); with more than one, what infer
    returns, the waveforms with upstream's silences between them, is ``output.wav``."""
    yielded = list(gen)
    if len(yielded) != 2 * segments - (0 if trailing_silence else 1):
        raise AssertionError(f"infer_generator yielded {len(yielded)} items: the text did not make {segments} segment(s)")
    for k in range(segments):
        rec.segment = k
        rec.put("waveform.wav", yielded[2 * k])
    rec.segment = 0
    if segments > 1:
        rec.put("output.wav", torch.cat(yielded[: 2 * segments - 1], 1))


def _finish_logits(rec: _Recorder) -> None:
    for k, steps in (rec.steps or {0: []}).items():
        rec.segment = k
        rec.put("codes.logits", torch.stack(steps, 1) if steps else torch.zeros(1, 0, 0))
    rec.segment = 0


def _clear_mel_cache(audio_module) -> None:
    """s2mel/modules/audio.py caches the mel filterbank and the window by sampling rate,
    fmax and device only (not n_fft, n_mels or win_size): a second configuration in one
    process would reuse the first one's.  Cleared, as in a fresh process."""
    audio_module.mel_basis.clear()
    audio_module.hann_window.clear()


def _segment_kwargs(segment_tokens) -> dict:
    return {} if segment_tokens is None else {"max_text_tokens_per_segment": int(segment_tokens)}


def _generation_kwargs(greedy: bool, max_codes: int, version: str) -> dict:
    kw = {"max_mel_tokens": int(max_codes)}
    if greedy:
        kw.update(num_beams=1, top_k=1) if version == "2.0" else kw.update(do_sample=False, num_beams=1)
    return kw


# ------------------------------------------------------------------ runs


def run_upstream_2_0(release_dir, prompt_wav_path, text, emo_wav_path=None, emo_alpha=1.0, emo_vector=None, seed=0,
                     max_codes=12, greedy=True, tts=None, normalize_emo_vector=False,
                     fresh=True, segment_tokens=None, segments=1) -> dict[str, torch.Tensor]:
    """``IndexTTS2.infer_generator`` (indextts2-inference 2.1.1) on ``text`` and the voice
    prompt, every intermediate recorded (keys :data:`KEYS_2_0`, plus
    ``emotion_vector.index`` with ``emo_vector``).

    ``tts``: an instance from :func:`load_2_0` to reuse.  ``fresh=False`` keeps its
    conditioning caches (upstream reuses the speaker and emotion conditioning of the
    same prompt paths between calls): the front-end keys are then absent from the trace.
    ``normalize_emo_vector``: pass ``emo_vector`` through upstream's ``normalize_emo_vec``
    first, as its web UI does (``infer_generator`` itself never calls it).
    ``segment_tokens``: infer's ``max_text_tokens_per_segment`` (default its own, 120),
    and the text is expected to make ``segments`` segments: the keys of the second on
    are ``key@k``, and ``output.wav`` is the joined waveform."""
    iv2 = infer_v2()
    tts = tts or load_2_0(release_dir)
    if fresh:
        tts._init_cache()
    if emo_vector is not None and normalize_emo_vector:
        emo_vector = tts.normalize_emo_vec(list(emo_vector), apply_bias=True)
    _clear_mel_cache(sys.modules["indextts.s2mel.modules.audio"])
    rec = _Recorder()
    try:
        _record_front_ends(rec, tts, True, ("_get_speaker_conditioning", "_get_emotion_conditioning"))
        rec.wrap(tts.semantic_codec, "quantize", _record_call(rec, "quantize", lambda i, a, k, out: (
            rec.put("semantic_codes.codes", out[0]), rec.put("semantic_codes.S_ref", out[1]))))
        index = []
        rec.wrap(iv2, "find_most_similar_cosine", _record_call(
            rec, "find_most_similar_cosine", lambda i, a, k, out: index.append(int(out))))
        rec.wrap(tts.gpt, "get_conditioning", _record_call(
            rec, "get_conditioning", lambda i, a, k, out: rec.put("speech_conditioning.conditioning", out)))

        def inference_speech(i, args, kwargs, out):
            rec.put("text.ids", args[1])
            rec.put("emotion_vector.emovec", kwargs["emo_vec"])
            rec.put("codes.raw", out[0])

        rec.wrap(tts.gpt, "inference_speech", _record_call(rec, "inference_speech", inference_speech))
        _record_generation(rec, tts.gpt)
        _advance(rec, tts.gpt, "merge_emovec")  # infer_v2 merges the emotion vector again for every segment

        def latents(module, args, kwargs, out):
            rec.put("codes.codes", args[3])  # cut at the first stop code, as the teacher-forced pass reads it
            rec.put("latents.latent", out)

        rec.hook(tts.gpt, latents)
        rec.hook(tts.s2mel.models["gpt_layer"], lambda m, a, k, out: rec.put("latent_projection.latent", out))
        rec.wrap(tts.semantic_codec.quantizer, "vq2emb", _record_call(
            rec, "vq2emb", lambda i, a, k, out: rec.put("code_embeddings.vq2emb", out.transpose(1, 2))))
        _record_diffusion_and_vocoder(rec, tts, seed)

        torch.manual_seed(seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _waveforms(rec, tts.infer_generator(
                str(prompt_wav_path), text, None, emo_audio_prompt=None if emo_wav_path is None else str(emo_wav_path),
                emo_alpha=emo_alpha, emo_vector=emo_vector, stream_return=True, **_segment_kwargs(segment_tokens),
                **_generation_kwargs(greedy, max_codes, "2.0")), segments, trailing_silence=True)
        _finish_logits(rec)
        if emo_vector is not None:
            rec.put("emotion_vector.index", torch.tensor(index))
    finally:
        rec.close()
    return rec.trace


def run_upstream_2_5(release_dir, prompt_wav_path, text, lang="en", emo_wav_path=None, emo_alpha=1.0, emo_vector=None,
                     seed=0, max_codes=12, greedy=True, tts=None, fresh=True, segment_tokens=None,
                     segments=1) -> dict[str, torch.Tensor]:
    """``IndexTTS2.infer_generator`` of indextts25-inference 0.2.0 (``text_normalization=
    False``), every intermediate recorded (keys :data:`KEYS_2_5`).  ``waveform.wav`` is
    upstream's own: ``clamp(32767 * wav, -32767, 32767)``, PCM scale.  ``tts`` and
    ``fresh`` as in :func:`run_upstream_2_0` (2.5 also caches the merged emotion vector
    per (voice, emotion, alpha)); ``segment_tokens`` and ``segments`` as there."""
    iv = infer_v2_5()
    tts = tts or load_2_5(release_dir)
    if fresh:
        for cache in (tts._spk_cache, tts._emo_cache, tts._emovec_cache):
            cache.clear()
    _clear_mel_cache(sys.modules["indextts25.s2mel.modules.audio"])
    rec = _Recorder()
    try:
        _record_front_ends(rec, tts, False, ("_speaker_conditioning", "_emotion_conditioning"))
        index = []
        rec.wrap(iv, "find_most_similar_cosine", _record_call(
            rec, "find_most_similar_cosine", lambda i, a, k, out: index.append(int(out))))
        rec.hook(tts.gpt.spk_emb_proj, lambda m, a, k, out: rec.put(
            "speech_conditioning.conditioning", out if out.ndim == 3 else out.unsqueeze(0)))

        def inference_speech(i, args, kwargs, out):
            rec.put("text.ids", args[0])
            rec.put("text.lang", args[1])
            rec.put("emotion_vector.emovec", args[2])
            rec.put("codes.raw", out)

        rec.wrap(tts.gpt, "inference_speech", _record_call(rec, "inference_speech", inference_speech))
        _record_generation(rec, tts.gpt)
        _advance(rec, tts.gpt, "inference_speech")  # the emotion vector is merged once, the codes per segment

        def decode(i, args, kwargs, out):
            rec.put("codes.codes", args[0])
            rec.put("code_features.S_infer", out)

        rec.wrap(tts.semantic_codec, "decode", _record_call(rec, "decode", decode))
        _record_diffusion_and_vocoder(rec, tts, seed)

        torch.manual_seed(seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _waveforms(rec, tts.infer_generator(
                str(prompt_wav_path), text, None, lang, emo_audio_prompt=None if emo_wav_path is None else str(emo_wav_path),
                emo_alpha=emo_alpha, emo_vector=emo_vector, stream_return=True, text_normalization=False,
                **_segment_kwargs(segment_tokens), **_generation_kwargs(greedy, max_codes, "2.5")), segments,
                trailing_silence=False)
        _finish_logits(rec)
        if emo_vector is not None:
            rec.put("emotion_vector.index", torch.tensor(index))
    finally:
        rec.close()
    return rec.trace
