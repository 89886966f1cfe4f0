"""What every upstream adapter of ``verify --forward`` shares: importing upstream's
packages without their ``__init__``, the refusal when one is missing, stand-in modules,
quieting upstream's warnings, and reading a config or a safetensors dump as upstream
would be handed them."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings

from ...errors import ConvertError

# Upstream package of each top-level module name an import may miss.
PACKAGES = {"indextts": "indextts2-inference", "indextts25": "indextts25-inference", "yaml": "PyYAML"}
INSTALL = ("install the test dependencies: pip install -r requirements-dev.txt and "
           "pip install --no-deps indextts2-inference==2.1.1 indextts25-inference==0.2.0 (make test does both)")


class UpstreamMissing(ConvertError):
    """Upstream code cannot be imported: the forward comparison cannot run."""


def _missing(what: str, e: ImportError) -> UpstreamMissing:
    name = (e.name or "").split(".")[0]
    if name in ("indextts", "indextts25") and e.name != name and name in sys.modules:
        pkg, tested = ("indextts2-inference", "2.1.1") if name == "indextts" else ("indextts25-inference", "0.2.0")
        head = f"the installed {pkg} has no module {e.name} (the version tested is {tested})"
    elif name:
        pkg = PACKAGES.get(name, name)
        head = f"package {pkg} is missing" + (f" (module {e.name})" if e.name != name else "")
    else:
        head = f"import failed: {e}"
    return UpstreamMissing(f"the forward comparison was not run: upstream {what} cannot be imported: {head}; {INSTALL}")


@contextlib.contextmanager
def _importing(what: str):
    try:
        yield
    except ImportError as e:
        raise _missing(what, e) from None


def indextts(module: str, package: str = "indextts"):
    """``indextts.<module>``, skipping ``indextts/__init__.py`` (it imports the whole
    inference stack): an empty package object whose path is the installed folder is
    registered in its place.  With ``package="indextts25"``, the same for IndexTTS-2.5's
    ``indextts25-inference``, whose ``__init__`` imports its inference API."""
    with _importing(f"{package}.{module}"):
        if package not in sys.modules:
            try:
                spec = importlib.util.find_spec(package)
            except ImportError:
                spec = None
            if spec is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError(f"No module named {package!r}", name=package)
            pkg = types.ModuleType(package)
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules[package] = pkg
        return importlib.import_module(f"{package}.{module}")


def indextts25(module: str):
    """``indextts25.<module>`` without the package's ``__init__``.  indextts25-inference
    (on PyPI) is IndexTTS-2.5's cut-down model code: a GPT without text_head, a codec
    with only its decoder.  Its GPT module needs tiktoken (the language table lives in
    the tokenizer module)."""
    return indextts(module, "indextts25")


def need(module: str, what: str):
    """A third-party module upstream depends on, or :class:`UpstreamMissing` naming the
    package."""
    with _importing(what):
        return importlib.import_module(module)


def need_config_reader() -> None:
    """omegaconf, with which infer_v2 reads config.yaml."""
    need("omegaconf", "config reader (omegaconf)")


@contextlib.contextmanager
def stand_ins(mods: dict, also: tuple[str, ...] = ()):
    """Put ``mods`` into ``sys.modules`` for the duration only; on the way out, those
    names and the ``also`` names are restored, present or absent as they were."""
    saved = {k: sys.modules.get(k) for k in (*mods, *also)}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


_TORCHAUDIO = ("torchaudio", "torchaudio.functional", "torchaudio.functional.functional")


def _torchaudio_refused(*args, **kwargs):
    raise RuntimeError("torchaudio stub (converters/cli/forward/): the mel helpers are not available")


def repcodec_module():
    """The module of ``repcodec_model``, the class ``build_semantic_codec`` builds (the
    w2v-bert adapter needs it too: ``maskgct_utils`` imports it).  Its package's
    ``kmeans/vocos.py`` imports ``_hz_to_mel`` and ``_mel_to_hz`` from
    ``torchaudio.functional.functional`` for vocos's mel/MDCT front ends, which RepCodec
    never uses.  torchaudio is built against one torch version, so a stub takes its
    place for this import alone and is removed afterwards (nothing else sees it); its
    two helpers raise if anyone calls them."""
    name = "indextts.utils.maskgct.models.codec.kmeans.repcodec_model"
    if name in sys.modules:
        return sys.modules[name]
    mods = {k: types.ModuleType(k) for k in _TORCHAUDIO}
    mods["torchaudio"].functional = mods["torchaudio.functional"]
    mods["torchaudio.functional"].functional = mods["torchaudio.functional.functional"]
    mods["torchaudio.functional.functional"]._hz_to_mel = _torchaudio_refused
    mods["torchaudio.functional.functional"]._mel_to_hz = _torchaudio_refused
    with stand_ins(mods):
        return indextts("utils.maskgct.models.codec.kmeans.repcodec_model")


@contextlib.contextmanager
def quiet():
    """Silence upstream's deprecation warnings (weight_norm) and transformers' loading
    messages and progress bars, restoring transformers' settings afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf = sys.modules.get("transformers")
        level = tf.logging.get_verbosity() if tf else None
        bars = tf.utils.logging.is_progress_bar_enabled() if tf else None
        if tf:
            tf.logging.set_verbosity_error()
            tf.utils.logging.disable_progress_bar()
        try:
            yield
        finally:
            if tf:
                tf.logging.set_verbosity(level)
                if bars:
                    tf.utils.logging.enable_progress_bar()


def is_safetensors(path: str) -> bool:
    return path.endswith(".safetensors")


def safetensors_state(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def as_omegaconf(cfg):
    """A config section in the form infer_v2 passes it to upstream (``OmegaConf.load``'s)."""
    OmegaConf = need("omegaconf", "config (omegaconf)").OmegaConf
    return cfg if not isinstance(cfg, dict) else OmegaConf.create(cfg)


def config_section(path: str, key: str):
    """``OmegaConf.load(path)[key]``: a section of config.yaml, read as infer_v2 reads it."""
    OmegaConf = need("omegaconf", "config (omegaconf)").OmegaConf
    cfg = OmegaConf.load(path)
    if key not in cfg:
        raise ConvertError(f"{path}: no {key}: section")
    return cfg[key]
