"""One frozen, validated configuration per workflow.

Each config checks itself once, in ``__post_init__``, with the helpers of :mod:`lightning_compress.engine.validation`
(errors name the argument, the value received and what is allowed). Allowed values come from the ``Literal`` aliases
below through ``typing.get_args``, so they are written once. ``to_dict()`` gives plain values (for checkpoints and
for the resume check).
"""

from __future__ import annotations

# --- pruning (PruningConfig) ---

# --- quantization (QuantConfig, ConversionConfig) ---
