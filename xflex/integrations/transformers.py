"""transformers' own switch: ``from_pretrained(..., attn_implementation="xattn")``.

:func:`register` adds an attention function to transformers'
``AttentionInterface`` that does what transformers' "sdpa" function
(``transformers/integrations/sdpa_attention.py``, 5.24) does, with
``xflex.sparse_sdpa`` in place of SDPA, and registers sdpa's mask builder
under the same name in ``AttentionMaskInterface``, so that the model builds
exactly the masks it builds for "sdpa" (padding, sliding windows, packing).
The model then calls the xflex op itself: no compile is needed, and under
``torch.compile`` (any backend, ``xattn`` included) the op is traced as an
opaque call, so nothing is rewritten twice.

``import xflex`` calls :func:`register_if_imported`: when transformers is
already imported, "xattn" is registered then. Importing transformers for a
user who may not need it would double the cost of ``import xflex`` (measured:
+1.9 s on top of xflex's 2.0 s), so otherwise call :func:`register` yourself.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch

from ..config import Config
from ..op import sparse_sdpa

__all__ = ["call_name", "register", "register_if_imported"]

DEFAULT_NAME = "xattn"
# Names this module registered (and may register again with another config).
_registered: set[str] = set()


def call_name(module: torch.nn.Module) -> str:
    """The name a transformers attention module's calls carry in ``SparsityStats``:
    ``layers.<layer_idx>.<class name>``, or the class name without a layer index.

    The module does not know its own path in the model (the compile path's names,
    e.g. ``model.layers.3.self_attn``); a ``threshold_by_call`` pattern such as
    ``"*layers.3.*"`` matches both.

    Example:
        >>> call_name(model.model.layers[3].self_attn)   # doctest: +SKIP
        'layers.3.LlamaAttention'
    """
    layer = getattr(module, "layer_idx", None)
    kind = type(module).__name__
    return kind if layer is None else f"layers.{layer}.{kind}"


def _attention_function(config: Config | None) -> Callable[..., tuple[torch.Tensor, None]]:
    """transformers' attention-function interface around ``sparse_sdpa``, with
    the decisions of transformers' ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    def xattn_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        position_bias: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        # query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D); sliding windows,
        # padding and packing are already in attention_mask (built by sdpa_mask).
        if kwargs.get("softcap") is not None:
            raise ValueError("attn_implementation='xattn' does not support `softcap` (as 'sdpa'); use 'eager'")
        if kwargs.get("output_attentions", False):
            warnings.warn("attn_implementation='xattn' returns no attention weights (output_attentions=True)")
        q_length = query.shape[2]
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # As sdpa: is_causal only for a prefill without a mask (a decode step
        # attends to every cached key).
        is_causal = q_length > 1 and attention_mask is None and is_causal
        if is_causal and key.shape[2] > q_length:
            # Prefill into an empty StaticCache: the keys past the queries are
            # empty slots, and is_causal is top-left aligned.
            key, value = key[:, :, :q_length], value[:, :, :q_length]
            if position_bias is not None:
                position_bias = position_bias[..., :q_length]
        if position_bias is not None:
            attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
            is_causal = False
        output = sparse_sdpa(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            is_causal=is_causal,
            scale=scaling,
            # GQA natively (sdpa repeats K/V when there is a mask; the op never needs to).
            enable_gqa=query.shape[1] != key.shape[1],
            config=config,
            name=call_name(module),
        )
        return output.transpose(1, 2).contiguous(), None

    return xattn_attention_forward


def register(config: Config | None = None, *, name: str = DEFAULT_NAME) -> str:
    """Register xflex with transformers as ``attn_implementation=name``.

    Args:
        config: the defaults of the registered function (``block_size`` among
            them: the others ``xflex.sparsity()`` also sets at run time);
            None: ``xflex.Config()``. Registering a name again replaces its
            config, also for models already loaded.
        name: the ``attn_implementation`` name; not one of transformers' own.

    Returns:
        ``name``.

    Example:
        >>> xflex.integrations.transformers.register(xflex.Config(block_size=64))   # doctest: +SKIP
        'xattn'
        >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="xattn")   # doctest: +SKIP
        >>> with xflex.sparsity(threshold=0.95) as stats:
        ...     model.generate(**inputs)                                            # doctest: +SKIP
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as error:
        raise ImportError(
            f"xflex.integrations.transformers needs transformers >= 5 (AttentionInterface, AttentionMaskInterface): {error}"
        ) from None
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be an xflex.Config or None, but got {type(config).__name__}")
    builtin = {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()} - _registered
    if not isinstance(name, str) or not name or name in builtin:
        raise ValueError(f"name must be a new attn_implementation name (not one of {sorted(builtin)}), but got {name!r}")
    AttentionInterface.register(name, _attention_function(config))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered.add(name)
    return name


def register_if_imported() -> None:
    """:func:`register` "xattn" with its defaults if transformers is already
    imported (what ``import xflex`` does); nothing otherwise, or when the
    installed transformers has no attention registry."""
    if "transformers" in sys.modules and DEFAULT_NAME not in _registered:
        try:
            register()
        except ImportError:
            pass
