"""The canonical format: the schema and its checker, the safetensors header, the
reversible ops and their specs, the declarative name-mapping tables, release
families and model signatures.

Layer 1: it may import ``converters.errors`` (and ``reference``'s torch-free tables) only.
"""
