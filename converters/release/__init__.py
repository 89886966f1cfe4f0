"""From a release folder to a bundle: the conversion engine of one file, source
discovery, the bundle's files and ``manifest.json``, and the inference pipeline
contract that the manifest records.

Layer 4: it may import ``converters.errors``, ``converters.format``, ``converters.io``
and ``converters.models``.
"""
