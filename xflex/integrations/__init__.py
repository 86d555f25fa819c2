"""Other libraries' own switches that route attention through xflex, without
``torch.compile``: ``transformers`` (``attn_implementation="xattn"``).

diffusers has none: its attention backends are members of the
``AttentionBackendName`` enum, which public API cannot extend (see README,
"Video diffusion transformers"); compile the transformer with
``backend="xattn"`` instead."""

from . import transformers

__all__ = ["transformers"]
