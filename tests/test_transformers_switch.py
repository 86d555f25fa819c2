"""transformers' own switch, ``attn_implementation="xattn"`` (no compile needed):
a tiny random Llama (GQA, left padding, generate, under ``model.compile``), a
tiny hybrid Qwen2 whose layers mix sliding-window and global attention, and
SmolLM2-135M, each against the same weights with ``attn_implementation="sdpa"``."""

import copy
import subprocess
import sys

import pytest
import torch
from models import count_xattn_compiles, tiny_llm_config

import xflex

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'xflex[demo]')")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

pytestmark = pytest.mark.slow

BLOCK = 64
# dense_row_blocks=4: rows that see at most 4 blocks (a 128-token window's
# are 3) keep them all; the global layers' later rows (up to 10) are cut.
CONFIG = xflex.Config(block_size=BLOCK, min_seq_len=BLOCK, dense_row_blocks=4)
LENGTH = 600  # 10 blocks of 64, the last one ragged
PAD = 70  # left padding of the second sequence
LAYERS = 2
NEW_TOKENS = 6
WINDOW = 128


def _tiny_config(kind):
    common = tiny_llm_config(LAYERS)
    if kind == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(
        **common, use_sliding_window=True, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]
    )


def _fp32_error(model, **inputs) -> float:
    """Max |logits| error of the fp32 model against its fp64 copy: the scale
    of error fp32 itself makes, from which tolerances are derived."""
    with torch.no_grad():
        fp32 = model(**inputs).logits.double()
        fp64 = copy.deepcopy(model).double()(**inputs).logits
    return (fp32 - fp64).abs().max().item()


def _assert_close(actual, expected, tolerance, what):
    diff = (actual - expected).abs().max().item()
    print(f"{what}: max |diff| {diff:.3e}, tolerance {tolerance:.3e}")
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tolerance)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """"xattn" with this module's block size; transformers' defaults after."""
    torch._dynamo.reset()
    xflex.integrations.transformers.register(CONFIG)
    yield
    xflex.integrations.transformers.register()
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (1, LENGTH), generator=gen)
    batch = torch.randint(3, 128, (2, LENGTH), generator=gen)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, :PAD] = 0
    return dict(ids=ids, batch=batch, mask=mask)


def _twins(kind, tmp_path_factory, inputs):
    """The model saved once and loaded twice, with "sdpa" and with "xattn"."""
    torch.manual_seed(0)
    model_class = LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM
    path = tmp_path_factory.mktemp(kind)
    model_class(_tiny_config(kind)).save_pretrained(path)
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    xattn = AutoModelForCausalLM.from_pretrained(path, attn_implementation="xattn").eval()
    tolerance = 4 * max(_fp32_error(sdpa, input_ids=inputs["ids"]), 1e-6)
    return sdpa, xattn, tolerance


@pytest.fixture(scope="module")
def llama(tmp_path_factory, inputs):
    return _twins("llama", tmp_path_factory, inputs)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, inputs):
    return _twins("hybrid", tmp_path_factory, inputs)


def test_import_xflex_registers_only_when_transformers_is_imported():
    # A fresh interpreter (this one has imported both): xflex alone leaves
    # transformers unimported; imported again after transformers, it registers.
    program = (
        "import importlib, sys, xflex; print('transformers' in sys.modules); import transformers; "
        "importlib.reload(xflex); from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS; "
        "print('xattn' in ALL_ATTENTION_FUNCTIONS)"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(name="sdpa"), ValueError, "name must be a new attn_implementation name"),
        (dict(name="eager"), ValueError, "name"),
        (dict(name=""), ValueError, "name"),
        (dict(config={"threshold": 0.9}), TypeError, "config must be an xflex.Config"),
    ],
)
def test_register_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        xflex.integrations.transformers.register(**kwargs)


@torch.no_grad()
def test_threshold_one_and_sparsity_off_match_sdpa(llama, inputs):
    sdpa, xattn, tolerance = llama
    expected = sdpa(input_ids=inputs["ids"]).logits
    with xflex.sparsity(enabled=False) as stats:
        off = xattn(input_ids=inputs["ids"]).logits
    assert {r.dense_reason for r in stats.records} == {"sparsity disabled"} and len(stats.records) == LAYERS
    _assert_close(off, expected, tolerance, "sparsity off")
    with xflex.sparsity(threshold=1.0) as stats:
        full = xattn(input_ids=inputs["ids"]).logits
    _assert_close(full, expected, tolerance, "threshold 1.0")
    # One entry per layer, and K/V reach the op unrepeated (native GQA).
    assert list(stats.density_by_call()) == [f"layers.{i}.LlamaAttention" for i in range(LAYERS)]
    assert stats.density == 1.0
    assert all(r.query_shape[1] == 4 and r.key_shape[1] == 2 for r in stats.records)
    with xflex.sparsity(threshold=0.5) as stats:
        xattn(input_ids=inputs["ids"])
    assert stats.density < 1.0


@torch.no_grad()
def test_left_padded_batch_matches_sdpa(llama, inputs):
    sdpa, xattn, tolerance = llama
    batch = dict(input_ids=inputs["batch"], attention_mask=inputs["mask"])
    keep = inputs["mask"].bool()  # padded rows attend to nothing: compare real tokens
    expected = sdpa(**batch).logits
    with xflex.sparsity(threshold=1.0) as stats:
        out = xattn(**batch).logits
    assert len(stats.sparse_calls) == LAYERS and stats.density == 1.0
    _assert_close(out[keep], expected[keep], tolerance, "left-padded batch")


@torch.no_grad()
def test_generate_prefills_sparse_decodes_dense_and_matches_sdpa(llama, inputs):
    sdpa, xattn, _ = llama
    prompt = dict(input_ids=inputs["batch"], attention_mask=inputs["mask"])
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = sdpa.generate(**prompt, **greedy)
    with xflex.sparsity(threshold=1.0) as stats:
        tokens = xattn.generate(**prompt, **greedy)
    assert torch.equal(tokens, expected)
    assert len(stats.sparse_calls) == LAYERS  # the prefill
    assert len(stats.dense_calls) == LAYERS * (NEW_TOKENS - 1)
    assert all("decode step" in r.dense_reason for r in stats.dense_calls)


@torch.no_grad()
def test_under_model_compile_the_backend_rewrites_nothing(llama, inputs):
    """The model calls the xflex op itself: the ``xattn`` backend finds no SDPA
    call (nothing is rewritten twice), and the op still runs every layer."""
    sdpa, xattn, tolerance = llama
    compiled = copy.deepcopy(xattn)
    compiled.compile(backend="xattn", options={"block_size": BLOCK})
    with count_xattn_compiles() as compiles, xflex.sparsity(threshold=1.0) as stats:
        out = compiled(input_ids=inputs["ids"]).logits
    assert compiles.call_count == 1
    assert xflex.last_compile_report() == []
    assert len(stats.sparse_calls) == LAYERS and stats.density == 1.0
    _assert_close(out, sdpa(input_ids=inputs["ids"]).logits, tolerance, "model.compile(backend='xattn')")


@torch.no_grad()
def test_hybrid_sliding_layers_keep_their_windows(hybrid, inputs):
    sdpa, xattn, tolerance = hybrid
    batch = dict(input_ids=inputs["batch"], attention_mask=inputs["mask"])
    keep = inputs["mask"].bool()
    sliding, full = "layers.0.Qwen2Attention", "layers.1.Qwen2Attention"
    with xflex.sparsity(threshold=1.0) as stats:
        out = xattn(**batch).logits
    _assert_close(out[keep], sdpa(**batch).logits[keep], tolerance, "hybrid threshold 1.0")
    visible = {r.name: int(r.visible_blocks.sum()) for r in stats.records}
    assert stats.density == 1.0
    # The window reached the op: a query block sees at most the 3 key blocks
    # its 128-token window spans; blocks past it are never visible, never computed.
    n_q = -(-LENGTH // BLOCK)
    assert visible[sliding] <= 3 * n_q * 2 * 4 < visible[full], visible  # batch 2, 4 heads
    with xflex.sparsity(threshold=0.5) as stats:
        xattn(**batch)
    density = stats.density_by_call()
    print(f"threshold 0.5: density by layer {density}")
    assert density[sliding] == 1.0  # every block inside the window
    assert density[full] < 1.0


# ----------------------------------------------------- SmolLM2-135M (real) ---

SMOLLM2_TOKENS = 512  # 4 blocks of the model's own 128


@torch.no_grad()
def test_smollm2_switches_to_xattn_and_matches_sdpa_at_threshold_one(smollm2_model):
    """The session's SmolLM2 (loaded once, "sdpa") switched to "xattn" in place
    with ``set_attn_implementation``, which checks the name as ``from_pretrained``
    does (the tiny models above are loaded with it)."""
    from xflex import demo

    model, tokenizer = smollm2_model
    ids = tokenizer(demo.DEFAULT_TEXT.read_text(), return_tensors="pt").input_ids[:, :SMOLLM2_TOKENS]
    expected = model(input_ids=ids).logits
    xflex.integrations.transformers.register(xflex.Config(min_seq_len=128))
    model.set_attn_implementation("xattn")
    try:
        with xflex.sparsity(threshold=1.0) as stats:
            logits = model(input_ids=ids).logits
    finally:
        model.set_attn_implementation("sdpa")
        xflex.integrations.transformers.register(CONFIG)
    assert len(stats.sparse_calls) == 30 and stats.density == 1.0
    # FlexAttention sums in another order than SDPA, over 30 layers: measured
    # max |diff| 1.0e-4 (logits of magnitude ~20).
    _assert_close(logits, expected, 1e-3, "SmolLM2 threshold 1.0")
