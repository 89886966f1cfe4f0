"""Reading and writing files: the checkpoint readers (zip and legacy ``.pth``,
safetensors), the config readers, the streaming writer with its staging and atomic
output, and hashing.

Layer 2: it may import ``converters.errors`` and ``converters.format``.
"""
