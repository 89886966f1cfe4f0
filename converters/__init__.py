"""Offline converters from IndexTTS-2's upstream checkpoints to canonical safetensors.

One module per model (``bigvgan``, ...) holds a declarative mapping table; the shared
machinery is ``sources`` (reading), ``ops`` (reversible transforms), ``table``
(resolution and accounting), ``schema`` (checking), ``st_write``/``staging``/``atomic``
(the streaming, atomic writer) and ``engine`` (the pipeline).
"""
