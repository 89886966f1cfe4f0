"""One module per model and release: each declares its mapping table, its config and
its refusals; :mod:`.registry` lists them and where their files are found.

Layer 3: it may import ``converters.errors``, ``converters.format`` and ``converters.io``.
"""
