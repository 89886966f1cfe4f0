"""Offline converters from IndexTTS-2's upstream checkpoints to canonical safetensors.

The subpackages are layers; each may import only those below it:

1. ``format``: the schema, the safetensors header, ops, tables and templates
2. ``io``: readers, the streaming writer, staging, atomic output, hashing
3. ``models``: one module per model and release, and their registry
4. ``release``: the engine, discovery, the bundle, the manifest, the pipeline contract
5. ``cli``: the commands and the upstream adapters of ``verify --forward``

``errors`` (below all of them) holds :class:`~converters.errors.ConvertError`;
``check`` keeps ``python -m converters.check`` working.  ``reference/`` never imports
this package.
"""
