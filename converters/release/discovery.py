"""Where a release's sources are: the release folder, its config and the Hugging Face
cache, for ``convert.py all`` (:mod:`release`).

- Each source is found from an explicit flag, else the release folder, else the Hugging
  Face cache, found and read offline through ``huggingface_hub`` (its environment
  rules; the snapshot ``refs/main`` names).  Never the network.  Each source's location
  is said.
- Every missing source is reported in one error, each with the places looked in and
  the command that fetches it.
- The vocoder is the one ``config.yaml`` names (``vocoder.name``), and a BigVGAN whose
  config disagrees with that name or with the s2mel mel settings is refused.
- A FIFO, a device or a socket where a source or ``config.yaml`` should be (or a folder
  where a file should be) is refused as not a regular file, naming the path, and never
  opened (:func:`registry.file_kind`): it is not reported missing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..format import family, schema
from ..errors import ConvertError
from ..io import configs
from ..io.files import file_kind, not_regular, regular_file
from ..models.registry import EXTRA_FILES, SOURCE_FILES, locate

RELEASE_REPO = "IndexTeam/IndexTTS-2"
RELEASE_REPOS = {"2.0": RELEASE_REPO, "2.5": "IndexTeam/IndexTTS-2.5"}
RELEASE_CONFIG = "config.yaml"
VOCODER = "{vocoder}"  # Item.hf repo placeholder: the vocoder config.yaml names
# infer_v2_5 ignores config.yaml's vocoder.name: it loads <release>/hf_cache/bigvgan, which
# utils/model_download.py fills from this repository (_BIGVGAN_REPO).
BIGVGAN_2_5 = "nvidia/bigvgan_v2_22khz_80band_256x"
UNUSED_2_5 = ("hf_cache/semantic_codec_model.safetensors", "MaskGCT/semantic_codec")  # the MaskGCT codec 2.5 never loads


@dataclass(frozen=True)
class Item:
    kind: str
    release: str  # file or folder inside the release folder (the first of candidates)
    hf: tuple[str, str] | None = None  # (repo id, path inside a snapshot) in the HF cache
    flag: str | None = None  # `all` option that names the source explicitly
    release_config: str | None = None  # config file taken from the release folder
    fetch: tuple[str, ...] = ()  # the files `huggingface-cli download` needs (from hf[0], else the release repo)
    more: tuple[str, ...] = ()  # further places in the release folder, after ``release``
    config_key: str | None = None  # config.yaml key naming the checkpoint (gpt_checkpoint, s2mel_checkpoint)

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.release, *self.more)

    @property
    def out(self) -> str:
        """The file name in OUT: the schema's ``file`` for the model (one place)."""
        return schema.model_spec(self.kind)["file"]


# Conversion order: smallest sources first and gpt last.  Each output's header waits for
# its source's sha256 (so the output can be hashed as it streams); the sources are
# hashed in this order from the start, and small models convert meanwhile.
# In a 2.0 release the auxiliary models sit in this tool's local layout (``campplus/``,
# ``MaskGCT/semantic_codec/``, ``bigvgan/``, ``w2v-bert-2.0/``) or where upstream's first run
# puts them (utils/model_download.py, shared by infer_v2 and infer_v2_5): ``hf_cache/``.
ITEMS: list[Item] = [
    Item("speaker-matrix", "feat1.pt", fetch=("feat1.pt",)),
    Item("emotion-matrix", "feat2.pt", fetch=("feat2.pt",)),
    Item("campplus", "campplus", hf=("funasr/campplus", ""), flag="campplus",
         fetch=("campplus_cn_common.bin",), more=("hf_cache/campplus_cn_common.bin",)),
    Item("semantic-codec", "MaskGCT/semantic_codec", hf=("amphion/MaskGCT", "semantic_codec"),
         flag="semantic_codec", release_config=RELEASE_CONFIG, fetch=("semantic_codec/model.safetensors",),
         more=("hf_cache/semantic_codec_model.safetensors",)),
    # upstream loads BigVGAN.from_pretrained(config.yaml vocoder.name); `bigvgan/` is this tool's local layout
    Item("bigvgan", "bigvgan", hf=(VOCODER, ""), flag="bigvgan",
         fetch=("bigvgan_generator.pt", "config.json"), more=("hf_cache/bigvgan",)),
    Item("s2mel", "s2mel.pth", fetch=("s2mel.pth",), config_key="s2mel_checkpoint"),
    Item("w2v-bert", "w2v-bert-2.0", hf=("facebook/w2v-bert-2.0", ""), flag="w2v_bert",
         fetch=("model.safetensors", "config.json", "preprocessor_config.json"), more=("hf_cache/w2v-bert-2.0",)),
    Item("gpt", "gpt.pth", fetch=("gpt.pth",), config_key="gpt_checkpoint"),
]
# IndexTTS-2.5 (infer_v2_5.py): hf_cache/ first, as upstream reads it; the codec is the
# release's codec.pth; BigVGAN is hf_cache/bigvgan or BIGVGAN_2_5 (vocoder.name is not read).
ITEMS_2_5: list[Item] = [
    Item("speaker-matrix", "feat1.pt", fetch=("feat1.pt",)),
    Item("emotion-matrix", "feat2.pt", fetch=("feat2.pt",)),
    Item("campplus", "hf_cache/campplus_cn_common.bin", hf=("funasr/campplus", ""), flag="campplus",
         fetch=("campplus_cn_common.bin",), more=("campplus",)),
    Item("semantic-codec", family.CODEC_2_5, flag="semantic_codec", release_config=RELEASE_CONFIG,
         fetch=(family.CODEC_2_5,)),
    Item("bigvgan", "hf_cache/bigvgan", hf=(BIGVGAN_2_5, ""), flag="bigvgan",
         fetch=("bigvgan_generator.pt", "config.json"), more=("bigvgan",)),
    Item("s2mel", "s2mel.pth", fetch=("s2mel.pth",), config_key="s2mel_checkpoint"),
    Item("w2v-bert", "hf_cache/w2v-bert-2.0", hf=("facebook/w2v-bert-2.0", ""), flag="w2v_bert",
         fetch=("model.safetensors", "config.json", "preprocessor_config.json"), more=("w2v-bert-2.0",)),
    Item("gpt", "gpt.pth", fetch=("gpt.pth",), config_key="gpt_checkpoint"),
]
ITEMS_BY_VERSION = {"2.0": ITEMS, "2.5": ITEMS_2_5}


# ------------------------------------------------------------------ discovery


def hf_cache_dir() -> str:
    """The Hugging Face hub cache as ``huggingface_hub`` resolves it from the
    environment (``HF_HUB_CACHE``, the legacy ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``,
    ``XDG_CACHE_HOME``, else ``~/.cache/huggingface/hub``), read when it is first imported."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hf_snapshot(cache: str, repo: str) -> str | None:
    """The snapshot folder of ``repo`` in the cache, offline: the revision ``refs/main``
    names (``snapshot_download(local_files_only=True)``); without a ref, the only
    snapshot there is; an error if there are several and none is marked; None if the
    repository is not cached."""
    from huggingface_hub import scan_cache_dir, snapshot_download
    from huggingface_hub.errors import CacheNotFound, LocalEntryNotFoundError

    try:
        return snapshot_download(repo, local_files_only=True, cache_dir=cache)
    except LocalEntryNotFoundError:
        pass
    try:
        cached = [r for r in scan_cache_dir(cache).repos if r.repo_id == repo and r.repo_type == "model"]
    except CacheNotFound:
        return None
    revs = sorted(r.commit_hash for c in cached for r in c.revisions)
    if len(revs) == 1:
        return str(next(iter(cached[0].revisions)).snapshot_path)
    if not revs:
        return None
    raise ConvertError(f"{cache}: {repo} has several snapshots ({', '.join(revs)}) and no refs/main; "
                       "name the one to use with a flag")


class Missing(Exception):
    """One source that was not found: where it was looked for, and how to get it."""


def fetch_command(repo: str, files, release_dir: str | None = None) -> str:
    where = f" --local-dir {release_dir}" if release_dir else ""
    return f"huggingface-cli download {repo} {' '.join(files)}{where}"


def _hf(item: Item, vocoder: str) -> tuple[str, str] | None:
    if item.hf is None:
        return None
    return (vocoder if item.hf[0] == VOCODER else item.hf[0]), item.hf[1]


def find_source(item: Item, release_dir: str, flags: dict[str, str | None], vocoder: str = "",
                doc: dict | None = None, version: str = family.DEFAULT) -> tuple[str, str]:
    """(path, how it was found) for one item; :class:`Missing` if it is nowhere."""
    if item.flag and flags.get(item.flag):
        return flags[item.flag], "given on the command line"
    hf = _hf(item, vocoder)
    looked = []
    note = ""
    named = (doc or {}).get(item.config_key) if item.config_key else None
    if isinstance(named, str) and named.strip():
        p = os.path.join(release_dir, named.strip())  # upstream: os.path.join(model_dir, cfg.gpt_checkpoint)
        if regular_file(p):
            return p, f"config.yaml {item.config_key}"
        note = f"; config.yaml {item.config_key} names {named.strip()}, which does not exist, so the release's own {item.release} is used"
    candidates = [os.path.join(release_dir, c) for c in item.candidates]
    if item.kind == "bigvgan" and vocoder and not os.path.isabs(vocoder) and version == "2.0":
        candidates.insert(0, os.path.join(release_dir, vocoder))  # a vocoder named by a folder in the release
    for p in candidates:
        kind = file_kind(p)
        if kind not in (None, "file", "folder") or (kind == "folder" and os.path.basename(p) in SOURCE_FILES[item.kind]):
            raise not_regular(p, expected=f"the {item.kind} checkpoint" + ("" if kind == "folder" else " or its folder"))
        if kind is not None:
            if _has_checkpoint(item, p):
                return p, "in the release folder" + note
            looked.append(f"{p} (no {' or '.join(SOURCE_FILES[item.kind])} in it)")
        else:
            looked.append(p)
    if hf:
        cache = hf_cache_dir()
        snap = hf_snapshot(cache, hf[0])
        if snap is not None:
            q = os.path.join(snap, hf[1]) if hf[1] else snap
            if file_kind(q) not in (None, "file", "folder"):
                raise not_regular(q, expected=f"the {item.kind} checkpoint or its folder")
            if os.path.exists(q) and _has_checkpoint(item, q):
                return q, f"in the Hugging Face cache ({hf[0]})"
            looked.append(f"{q} (a partial snapshot: no {' or '.join(SOURCE_FILES[item.kind])})" if os.path.exists(q) else q)
        else:
            looked.append(os.path.join(cache, "models--" + hf[0].replace("/", "--")))
    how = fetch_command(hf[0], item.fetch) if hf else fetch_command(RELEASE_REPOS[version], item.fetch, release_dir)
    flag = f", or pass --{item.flag.replace('_', '-')} PATH" if item.flag else ""
    raise Missing(f"{item.kind}: looked in {', '.join(looked)}; fetch it with `{how}`{flag}")


def _has_checkpoint(item: Item, path: str) -> bool:
    """A checkpoint file, or a folder with one (a special file there is refused)."""
    if file_kind(path) == "file":
        return True
    return any(regular_file(os.path.join(path, n)) for n in SOURCE_FILES[item.kind])


def read_release_config(release_dir: str, version: str = family.DEFAULT) -> tuple[str, dict]:
    import yaml

    path = os.path.join(release_dir, RELEASE_CONFIG)
    if not regular_file(path):
        raise Missing(f"{RELEASE_CONFIG}: not in {release_dir}; fetch it with "
                      f"`{fetch_command(RELEASE_REPOS[version], (RELEASE_CONFIG,), release_dir)}`")
    try:
        with open(path) as f:
            doc = configs.parse_yaml(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConvertError(f"{path}: cannot read the release config: {e}") from None
    if not isinstance(doc, dict):
        raise ConvertError(f"{path}: the release config is not a YAML mapping")
    return path, doc


def vocoder_name(doc: dict, path: str) -> str:
    """``vocoder.name`` (upstream: ``BigVGAN.from_pretrained(cfg.vocoder.name)``)."""
    v = doc.get("vocoder")
    if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"].strip():
        raise ConvertError(f"{path}: config has no vocoder.name (IndexTTS-2 loads the BigVGAN it names)")
    if v.get("type", "bigvgan") != "bigvgan":
        raise ConvertError(f"{path}: vocoder.type {v.get('type')!r} is not supported (IndexTTS-2 uses bigvgan)")
    return v["name"].strip()


# bigvgan_v2_22khz_80band_256x: sample rate (kHz, rounded), mel bands, hop (samples per frame)
_VOCODER_NAME = re.compile(r"bigvgan_v2_(\d+)khz_(\d+)band_(\d+)x")
# BigVGAN config.json key -> s2mel spect_params key: the mel the DiT writes is the mel BigVGAN reads
_MEL_KEYS = {"num_mels": "n_mels", "hop_size": "hop_length", "n_fft": "n_fft", "win_size": "win_length", "fmin": "fmin", "fmax": "fmax"}


def check_vocoder(src: str, name: str, doc: dict, config_path: str) -> None:
    """Refuse a BigVGAN whose config.json disagrees with the name config.yaml gives it,
    or with the s2mel mel settings."""
    from ..io.configs import load_json

    _, cfg_file = locate("bigvgan", src, None)
    v = load_json(cfg_file)
    bad = []
    m = _VOCODER_NAME.search(name)
    if m:
        khz, band, hop = map(int, m.groups())
        if round(v.get("sampling_rate", 0) / 1000) != khz:
            bad.append(f"sampling_rate {v.get('sampling_rate')} is not {khz} kHz")
        if v.get("num_mels") != band:
            bad.append(f"num_mels {v.get('num_mels')} is not {band}")
        if v.get("hop_size") != hop:
            bad.append(f"hop_size {v.get('hop_size')} is not {hop}")
    if bad:
        raise ConvertError(f"{cfg_file}: this BigVGAN is not the vocoder {config_path} names ({name}): {'; '.join(bad)}")
    pre = (doc.get("s2mel") or {}).get("preprocess_params") or {}
    spect = pre.get("spect_params") or {}
    if "sampling_rate" in v and "sr" in pre and v["sampling_rate"] != pre["sr"]:
        bad.append(f"sampling_rate {v['sampling_rate']} vs s2mel sr {pre['sr']}")
    for vk, sk in _MEL_KEYS.items():
        if vk in v and sk in spect:
            a, b = v[vk], spect[sk]
            if sk == "fmax":  # infer_v2: "None" (or absent) -> None; anything else -> 8000
                b = None if b is None or b == "None" else 8000
            if a != b:
                bad.append(f"{vk} {a!r} vs s2mel {sk} {b!r}")
    if bad:
        raise ConvertError(f"{cfg_file}: this BigVGAN does not fit the s2mel mel settings in {config_path}: {'; '.join(bad)}")


def release_version(release_dir: str) -> tuple[str, str]:
    """(family version, why) of a release folder, from its files (:func:`family.release_version`);
    the GPT's and codec's tensors confirm it when they are converted."""
    try:
        return family.release_version(release_dir)
    except family.Unsupported as e:
        raise ConvertError(str(e)) from None


def discover(release_dir: str, flags: dict[str, str | None], version: str = family.DEFAULT) -> tuple[list, str, dict]:
    """Every source, or one error naming every missing one.  Returns
    ([(item, path, how, config)], config.yaml path, config.yaml document)."""
    missing, found = [], []
    try:
        cfg_path, doc = read_release_config(release_dir, version)
        # infer_v2_5 loads hf_cache/bigvgan whatever vocoder.name says
        vocoder = vocoder_name(doc, cfg_path) if version == "2.0" else BIGVGAN_2_5
    except Missing as e:
        missing.append(str(e))
        cfg_path, doc, vocoder = os.path.join(release_dir, RELEASE_CONFIG), {}, ""
    for item in ITEMS_BY_VERSION[version]:
        try:
            src, how = find_source(item, release_dir, flags, vocoder, doc, version)
        except Missing as e:
            missing.append(str(e))
            continue
        config = os.path.join(release_dir, item.release_config) if item.release_config else None
        found.append((item, src, how, config))
    for item in ITEMS_BY_VERSION[version]:
        for opt, (_, name) in EXTRA_FILES.get(item.kind, {}).items():
            p = os.path.join(release_dir, name)
            if not regular_file(p):
                missing.append(f"{item.kind} {opt}: {p} is missing; fetch it with "
                               f"`{fetch_command(RELEASE_REPOS[version], (name,), release_dir)}`")
    if missing:
        raise ConvertError(f"{release_dir}: {len(missing)} source(s) not found, nothing was converted:\n  " + "\n  ".join(missing))
    src, how = next((src, how) for item, src, how, _ in found if item.kind == "bigvgan")
    if version == "2.5" and not how.startswith("in the Hugging Face cache"):
        vocoder = ""  # infer_v2_5 loads hf_cache/bigvgan as it is; the repository name applies to the cache's copy only
    check_vocoder(src, vocoder, doc, cfg_path)
    return found, cfg_path, doc
