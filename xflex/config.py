"""xflex settings: one validated object from `torch.compile(options=...)`
defaults and `xflex.sparsity(...)` run-time overrides."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache

import torch

from typing import Literal, get_args

from .attention.backends import BACKENDS, Backend
from .attention.constants import device_constant
from .attention.flex import ATTENTION_KERNELS, AttentionKernel
from .attention.scoring import PAIRINGS, PRECISIONS, REDUCTIONS, Pairing, Precision, Reduction

__all__ = ["COMPILE_TIME_OPTIONS", "Config", "METHODS", "Method", "RUNTIME_OPTIONS", "SCORING_REDUCTIONS", "ScoringReduction", "Threshold"]

_BLOCK_SIZES = (32, 64, 128, 256)

Threshold = float | tuple[float, ...]
"""One tau for every query head, or one per query head."""

Method = Literal["adaptive", "threshold"]
"""How blocks are chosen. ``"threshold"``: XAttention's rule, each query
block keeps the fewest key blocks whose *estimated* mass reaches ``threshold``.
``"adaptive"``: the same estimate, but per head the threshold and scorer
temperature are chosen, on a few probe query blocks whose exact attention is
computed, so that the kept blocks hold ``threshold`` of the *true* mass there
(``xflex.attention.selection.probes``)."""
METHODS: tuple[str, ...] = get_args(Method)

ScoringReduction = Reduction
"""The estimate's reduction (``xflex.attention.scoring.Reduction``); with
``"mean+max"`` the plan keeps the blocks either estimate's selection keeps."""
SCORING_REDUCTIONS: tuple[str, ...] = REDUCTIONS


@dataclasses.dataclass(frozen=True)
class Config:
    """Sparse-attention settings.

    Attributes:
        enabled: run attention block-sparse (False: every call runs dense SDPA).
        method: ``"threshold"`` or ``"adaptive"`` (see :data:`Method`).
        scorer: which products of each ``S x S`` tile the estimate sums:
            ``"interleaved"`` (the default: query - key offsets of every
            residue mod S but S/2; ``xflex.attention.scoring.paired_query_rows``)
            or ``"antidiagonal"`` (XAttention's; its offsets are all odd, so
            the diagonal and slash lines at even offsets are never seen).
            Same cost; bench/RESULTS.md, "The interleaved pairing".
        scoring_precision: what the estimate multiplies: ``"input"`` q and k
            as given, or ``"fp8"``: where the Gluon scorer runs (Hopper,
            ~32K tokens and up), their e4m3 rounding
            with a power-of-two scale per head, in 0.64-0.71x of the time,
            same recall on every family measured; other scorers ignore it
            (bench/RESULTS.md, "FP8 scoring").
        scoring_reduction: how each tile's S paired products become one
            logit of the estimate: ``"mean"`` (XAttention's), ``"max"``, or
            ``"mean+max"`` (the default): both from one scorer pass, and per
            head the union of their cuts, or the max's selection alone where
            the mean over-selects (``max_alone_ratio``). The mean's
            exponential underrates tiles whose products vary (needles, hot
            keys, sharp neighbourhoods) and is nearly flat on spiky heads;
            the max alone lost 2 of SmolLM2's 18 harness retrievals that the
            mean keeps. The default keeps SmolLM2's 18 harness and 24
            held-out prompts' retrievals as dense, perplexity within 0.11%,
            needles' worst head row 0.975 at 64K (mean: 0.887), sharp
            video-like attention at the oracle's density (mean: 1.37x) and
            spiky attention sparse at recall 0.95 (mean: dense), for the
            max's share of the scorer pass: LLM-like 128K with FLASH 3.49x
            (mean) -> 3.00x (bench/RESULTS.md, "Choosing the estimate per
            head"). ``"max"`` with ``relative_floor=0.01`` and tau 0.999
            takes the spiky family at 128K to 4.2-5.8x over cuDNN at recall
            0.950-0.956 ("The spiky family at 128K").
        threshold: tau in (0, 1], the share of attention mass to keep: of the
            true mass on probe rows (``"adaptive"``), or of the estimated mass
            in every row (``"threshold"``); 1.0 keeps every visible block.
            A sequence gives one value per query head.
        probe_blocks: query blocks per call whose exact attention (on 32
            evenly spaced rows of each) finds the vertical lines
            (``vertical_mass``) and calibrates the ``"adaptive"`` method,
            and on which the break-even forecast reads the selection's
            density (the last ones of a causal call, spread over the
            sequence otherwise).
        vertical_mass: a key block whose true attention mass on the probe
            rows exceeds the estimate's share by at least this much (the
            mean over probe rows) is kept in every row that sees it, on top
            of the method's blocks: hot keys, which the strided estimate
            dilutes (``xflex.attention.selection.vertical``). 0 turns it off.
            Costs one exact-attention pass over the probe rows
            (bench/RESULTS.md, "Vertical lines").
        slash_mass: a block diagonal (query block - key block) whose true
            mass on the probe rows exceeds the estimate's share by at least
            this much (the mean over probe rows) is kept in every row:
            attention a fixed distance back (slash lines), at offsets the
            estimate's pairing may never sample
            (``xflex.attention.selection.slash``). 0 turns it off. Shares
            the vertical lines' exact pass over the probe rows. On by
            default since the fifteenth session: the spiky family's
            max-alone heads need it (128K recall 0.922 -> 0.953), SmolLM2's
            harness keeps its retrievals for +1.3% density (bench/RESULTS.md,
            "Choosing the estimate per head").
        relative_floor: also keep every visible block whose estimated score
            reaches this fraction of the largest in its row (FlashPrefill's
            rule beside the threshold cut; 0 turns it off). A sharp estimate
            (``"max"``) gives blocks without planted structure shares
            orders of magnitude below a hot key's, but rates hot keys
            themselves within a factor of a few of their mass: the floor
            keeps the ones the cut drops. With ``"max"`` at 0.01: worst head
            rows +0.01-0.05 on spiky inputs, +0.04 on sharp video, +0.000-
            0.006 on needles, for +0.000-0.004 density
            (bench/RESULTS.md, "A floor relative to the row's largest
            block"); with the mean it is one more point on the tau curve.
        max_alone_ratio: under ``scoring_reduction="mean+max"``, a head
            whose mean cut keeps more than this many times the blocks of its
            max cut (at tau, over all its query rows) keeps the max's
            selection alone, cut at ``1 - (1 - tau) / 10`` (its lines and
            floor from the max's scores), instead of the union: spiky heads,
            where the mean's flat estimate keeps most blocks
            (``xflex.attention.selection.estimates``). 0: the union
            everywhere. At 2 almost no head of SmolLM2 and none of the llm,
            needle, smooth video and diffuse families at 64K is alone; at
            1.5 some llm and needle heads are, and lose worst-row recall.
        threshold_by_call: per-call thresholds, ``{pattern: threshold}``: the
            first pattern (``fnmatch``, e.g. ``"*layers.[3-9].*"``) that matches
            a call's name (as in ``SparsityStats``) gives its threshold; other
            calls use ``threshold``. Weak layers can keep more mass this way.
        text_tokens_by_call: where joint text + video (or image) attention
            calls hold their text tokens, ``{pattern: n}`` (first matching
            pattern, as ``threshold_by_call``): ``n > 0`` the first ``n``
            tokens of the call (Flux, CogVideoX), ``n < 0`` the last ``-n``
            (HunyuanVideo). Their blocks stay dense: a query block holding a
            text token keeps every visible key block, and every query block
            keeps the key blocks holding one, on top of the blocks the
            threshold keeps as without them (text only adds blocks).
        stride: the estimate's stride S (tile side); divides ``block_size`` (8: more accurate,
            16: faster scoring; at 16 the ``"antidiagonal"`` scorer loses
            video-like attention's worst rows, bench/RESULTS.md, "The
            interleaved pairing").
        block_size: FlexAttention block size (fixed per compiled model).
        min_seq_len: calls whose key length is below this run dense.
        keep_sink: causal calls always keep the first key block.
        keep_recent: tokens before each query's own position whose blocks are
            always kept (0: just the diagonal block).
        dense_row_blocks: a query block that sees at most this many key blocks
            keeps all of them: the estimate only drops blocks from rows that
            see more. Sliding-window and local attention (whose own mask
            already skips the far blocks), short cross-attention and the first
            rows of a causal call stay exact.
        backend: which implementation the scoring and selection stages run:
            "auto" (Triton kernels on CUDA when Triton is installed, the Gluon
            scorer for large Hopper calls, plain torch on the CPU), "torch",
            "triton" or "gluon" (see ``xflex.attention.backends.Backend``).
        attention_kernel: the FlexAttention kernel over the selected blocks:
            "auto" (its FlashAttention-4 "FLASH" backend where installed and
            able to run the call, else Triton), "triton" or "flash" (see
            ``xflex.attention.flex``).
        break_even: on devices whose costs ``xflex.policy.MEASURED_BREAK_EVEN``
            lists, a call runs dense SDPA where sparse attention would not pay:
            keys fewer than the device's break-even length, or a selection
            denser than its break-even density (each such call is a dense
            fallback with its reason in the stats). False: always sparse when
            eligible.
    """

    enabled: bool = True
    method: Method = "threshold"
    scorer: Pairing = "interleaved"
    scoring_precision: Precision = "input"
    scoring_reduction: ScoringReduction = "mean+max"
    threshold: Threshold = 0.99
    probe_blocks: int = 4
    vertical_mass: float = 0.005
    slash_mass: float = 0.005
    relative_floor: float = 0.0
    max_alone_ratio: float = 2.0
    threshold_by_call: tuple[tuple[str, Threshold], ...] = ()
    text_tokens_by_call: tuple[tuple[str, int], ...] = ()
    stride: int = 8
    block_size: int = 128
    min_seq_len: int = 1024
    keep_sink: bool = True
    keep_recent: int = 0
    dense_row_blocks: int = 16
    backend: Backend = "auto"
    attention_kernel: AttentionKernel = "auto"
    break_even: bool = True

    def __post_init__(self) -> None:
        _validate_config(self)

    @classmethod
    def from_options(cls, options: Mapping[str, object] | None, base: Config | None = None) -> Config:
        """Validated config from a mapping of option names (unknown names raise)."""
        base = base or cls()
        options = dict(options or {})
        unknown = sorted(set(options) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown xflex option(s) {unknown}; expected some of {sorted(_FIELDS)}")
        if "threshold" in options:
            options["threshold"] = _normalise_threshold(options["threshold"])
        if "threshold_by_call" in options:
            options["threshold_by_call"] = _normalise_by_call(options["threshold_by_call"], _normalise_threshold)
        if "text_tokens_by_call" in options:
            options["text_tokens_by_call"] = _normalise_by_call(options["text_tokens_by_call"])
        return dataclasses.replace(base, **options)

    def override(self, overrides: Mapping[str, object]) -> Config:
        """This config with run-time overrides applied (block_size cannot change)."""
        if "block_size" in overrides and overrides["block_size"] != self.block_size:
            raise ValueError(
                f"block_size is fixed when the model is compiled (block_size={self.block_size}); "
                f"pass it in torch.compile(..., options={{'block_size': ...}}), not at run time"
            )
        return Config.from_options(overrides, base=self)

    # A frozen config's key is a constant: dynamo takes it as one instead of
    # tracing json (which it cannot), so compiled code may call sparse_sdpa.
    @torch.compiler.assume_constant_result
    def to_key(self) -> str:
        """A string that carries this config through an FX graph and back."""
        return _config_key(self)

    @staticmethod
    def from_key(key: str) -> Config:
        """The config :meth:`to_key` wrote."""
        return _config_from_key(key)

    @property
    def reductions(self) -> tuple[Reduction, ...]:
        """The scorer reductions ``scoring_reduction`` names, the first the
        estimate the vertical lines, the forecast and calibration read."""
        return tuple(self.scoring_reduction.split("+"))  # type: ignore[return-value]

    def threshold_for(self, call_name: str) -> Threshold:
        """The threshold of the call named ``call_name`` (see ``threshold_by_call``)."""
        return _first_match(self.threshold_by_call, call_name, self.threshold)

    def text_tokens_for(self, call_name: str) -> int:
        """The text tokens of the call named ``call_name`` (see
        ``text_tokens_by_call``): ``n > 0`` the first n, ``n < 0`` the last -n, 0 none."""
        return _first_match(self.text_tokens_by_call, call_name, 0)

    def threshold_tensor(self, num_heads: int, device: torch.device, call_name: str = "") -> torch.Tensor:
        """The call's threshold per query head, shaped ``(1, H, 1, 1)`` to broadcast over scores."""
        threshold = self.threshold_for(call_name)
        values = threshold if isinstance(threshold, tuple) else (threshold,) * num_heads
        if len(values) != num_heads:
            raise ValueError(
                f"threshold of call {call_name!r} has one value per query head, but got {len(values)} values "
                f"for {num_heads} heads"
            )
        return device_constant(tuple(values), torch.device(device)).view(1, len(values), 1, 1)


@lru_cache(maxsize=256)
def _config_key(config: Config) -> str:
    # Cached: every eager sparse_sdpa call passes its config as a key (json.dumps of asdict: ~0.2 ms).
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _first_match(pairs: tuple[tuple[str, object], ...], call_name: str, default: object):
    """The value of the first ``(fnmatch pattern, value)`` pair matching ``call_name``."""
    for pattern, value in pairs:
        if fnmatch.fnmatchcase(call_name, pattern):
            return value
    return default


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
COMPILE_TIME_OPTIONS = ("block_size",)
RUNTIME_OPTIONS = tuple(name for name in _FIELDS if name not in COMPILE_TIME_OPTIONS)


@lru_cache(maxsize=256)
def _config_from_key(key: str) -> Config:
    values = json.loads(key)
    values["threshold"] = _normalise_threshold(values["threshold"])
    values["threshold_by_call"] = _normalise_by_call(values["threshold_by_call"], _normalise_threshold)
    values["text_tokens_by_call"] = _normalise_by_call(values["text_tokens_by_call"])
    return Config(**values)


def _normalise_threshold(value: object) -> Threshold:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(float(v) if _is_real(v) else v for v in value)  # type: ignore[misc]
    return float(value) if _is_real(value) else value  # type: ignore[return-value]


def _normalise_by_call(value: object, normalise_value: Callable[[object], object] = lambda v: v) -> object:
    """A ``{pattern: value}`` mapping (or its ``(pattern, value)`` pairs, as
    JSON carries them) to a tuple of pairs, order kept; anything else is
    returned for validation to reject."""
    pairs = value.items() if isinstance(value, Mapping) else value
    if not isinstance(pairs, Iterable) or isinstance(pairs, str):
        return value
    pairs = list(pairs)
    if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in pairs):
        return value
    return tuple((pattern, normalise_value(v)) for pattern, v in pairs)


def _valid_threshold(value: object) -> bool:
    values = value if isinstance(value, tuple) else (value,)
    return len(values) > 0 and all(_is_real(t) and 0.0 < t <= 1.0 and not math.isnan(t) for t in values)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"xflex option {name!r} must be {expected}, but got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_config(c: Config) -> None:
    _check(isinstance(c.enabled, bool), "enabled", "a bool", c.enabled)
    _check(
        _valid_threshold(c.threshold),
        "threshold",
        "a float in (0, 1] or a non-empty sequence of them (one per query head)",
        c.threshold,
    )
    _check(
        isinstance(c.threshold_by_call, tuple)
        and all(isinstance(pattern, str) and _valid_threshold(t) for pattern, t in c.threshold_by_call),
        "threshold_by_call",
        "a mapping from call-name patterns (str) to thresholds (a float in (0, 1] or one per query head)",
        c.threshold_by_call,
    )
    _check(
        isinstance(c.text_tokens_by_call, tuple)
        and all(isinstance(pattern, str) and _is_int(n) and n != 0 for pattern, n in c.text_tokens_by_call),
        "text_tokens_by_call",
        "a mapping from call-name patterns (str) to a non-zero int (n > 0: the first n tokens, n < 0: the last -n)",
        c.text_tokens_by_call,
    )
    _check(c.block_size in _BLOCK_SIZES, "block_size", f"one of {_BLOCK_SIZES}", c.block_size)
    _check(
        _is_int(c.stride) and c.stride >= 1 and c.block_size % c.stride == 0 and c.block_size // c.stride <= 128,
        "stride",
        f"a positive int dividing block_size={c.block_size}, at least block_size/128 (e.g. 4, 8, 16)",
        c.stride,
    )
    _check(_is_int(c.min_seq_len) and c.min_seq_len >= 0, "min_seq_len", "an int >= 0", c.min_seq_len)
    _check(isinstance(c.keep_sink, bool), "keep_sink", "a bool", c.keep_sink)
    _check(_is_int(c.keep_recent) and c.keep_recent >= 0, "keep_recent", "an int >= 0 (tokens)", c.keep_recent)
    _check(_is_int(c.dense_row_blocks) and c.dense_row_blocks >= 0, "dense_row_blocks", "an int >= 0 (blocks)", c.dense_row_blocks)
    _check(c.backend in BACKENDS, "backend", f"one of {BACKENDS}", c.backend)
    _check(c.method in METHODS, "method", f"one of {METHODS}", c.method)
    _check(c.scorer in PAIRINGS, "scorer", f"one of {PAIRINGS}", c.scorer)
    _check(c.scoring_precision in PRECISIONS, "scoring_precision", f"one of {PRECISIONS}", c.scoring_precision)
    _check(c.scoring_reduction in SCORING_REDUCTIONS, "scoring_reduction", f"one of {SCORING_REDUCTIONS}", c.scoring_reduction)
    _check(c.attention_kernel in ATTENTION_KERNELS, "attention_kernel", f"one of {ATTENTION_KERNELS}", c.attention_kernel)
    _check(isinstance(c.break_even, bool), "break_even", "a bool", c.break_even)
    _check(_is_int(c.probe_blocks) and c.probe_blocks >= 1, "probe_blocks", "an int >= 1", c.probe_blocks)
    _check(
        _is_real(c.max_alone_ratio) and (c.max_alone_ratio == 0 or c.max_alone_ratio >= 1),
        "max_alone_ratio",
        "0 (off) or a float >= 1",
        c.max_alone_ratio,
    )
    for name in ("vertical_mass", "slash_mass", "relative_floor"):
        value = getattr(c, name)
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1, name, "a float in [0, 1) (0: off)", value)
