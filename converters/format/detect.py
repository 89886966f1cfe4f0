"""Tell which IndexTTS-2 model a set of tensor names belongs to, by name signatures.

Used to refuse a checkpoint given to the wrong converter with a helpful message, and
by ``inspect``.  Signatures are names, never shapes.
"""

from __future__ import annotations

# model kind -> name prefixes that must all occur
SIGNATURES: dict[str, tuple[str, ...]] = {
    "gpt": ("gpt.h.0.", "mel_embedding."),  # IndexTTS-2.0 and 2.5 (family.gpt_version tells them apart)
    "s2mel": ("cfm.estimator.", "length_regulator."),
    "w2v-bert": ("feature_projection.", "encoder.layers.0."),
    "bigvgan": ("conv_pre.", "ups.0.", "resblocks.0."),
    "semantic-codec": ("encoder.0.convnext.0.", "quantizer.quantizers.0.codebook."),
    "campplus": ("head.layer1.0.", "xvector.block1.tdnnd1."),
    # speaker-matrix / emotion-matrix: a bare tensor each (feat1.pt, feat2.pt); no name tells them apart
}


def detect(names) -> str | None:
    names = list(names)
    hits = [kind for kind, prefixes in SIGNATURES.items() if all(any(n.startswith(p) for n in names) for p in prefixes)]
    return hits[0] if len(hits) == 1 else None
