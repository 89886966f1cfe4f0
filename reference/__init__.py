"""The reference runtime: the executable specification of the canonical format.

Plain PyTorch forwards that read only canonical files (tensors by canonical name and
the ``__metadata__`` ``config``), one module per model, and the loader they read
through (:mod:`reference.load`).  Nothing here imports upstream code, transformers,
``config.yaml`` or ``converters/``.
"""

REFERENCE_VERSION = "1"
