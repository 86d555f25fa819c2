"""Hugging Face transformers models under `torch.compile(backend="xattn")`:
a tiny random Llama (GQA, causal and padded mask paths, generate) and the real SmolLM2-135M-Instruct at a short length."""

import copy
import math

import pytest
import torch
import torch._dynamo.testing
from models import count_xattn_compiles, tiny_llm_config

import xflex

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'xflex[demo]')")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

pytestmark = pytest.mark.slow

# dense_row_blocks=0: at these lengths every row sees at most 5 blocks, which
# the default (16) would keep whole; the tests are about the threshold cut.
OPTIONS = {"block_size": 64, "min_seq_len": 64, "dense_row_blocks": 0}
LENGTH = 300  # 5 blocks of 64, the last one ragged
PAD = 40  # left padding of the second sequence in the batch
LAYERS = 2
NEW_TOKENS = 8


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        **tiny_llm_config(LAYERS),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def _fp32_error(model, **inputs) -> float:
    """Max |logits| error of the fp32 eager model against its fp64 copy: the
    scale of error fp32 itself makes, from which tolerances are derived."""
    with torch.no_grad():
        fp32 = model(**inputs).logits.double()
        fp64 = copy.deepcopy(model).double()(**inputs).logits
    return (fp32 - fp64).abs().max().item()


def _assert_close(actual, expected, tolerance, what):
    diff = (actual - expected).abs()
    print(f"{what}: max diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, tolerance {tolerance:.3e}")
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tolerance)


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------- tiny random Llama ---


@pytest.fixture(scope="module")
def tiny():
    """The eager tiny Llama, its xattn-compiled twin, inputs and references."""
    model = _tiny_llama()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (1, LENGTH), generator=gen)
    batch = torch.randint(3, 128, (2, LENGTH), generator=gen)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, :PAD] = 0
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        expected_batch = model(input_ids=batch, attention_mask=mask).logits
    # Inductor and FlexAttention reorder fp32 sums: allow 4x what fp32 itself errs.
    tolerance = 4 * max(_fp32_error(model, input_ids=ids), 1e-6)
    compiled = torch.compile(model, backend="xattn", options=OPTIONS)
    return dict(
        model=model, compiled=compiled, ids=ids, batch=batch, mask=mask,
        expected=expected, expected_batch=expected_batch, tolerance=tolerance,
    )


@pytest.fixture(scope="module")
def causal_report(tiny):
    """Compile report of the plain prefill (no attention_mask: HF passes
    attn_mask=None, is_causal=True and native GQA)."""
    with torch.no_grad(), xflex.sparsity(threshold=1.0) as stats:
        tiny["compiled"](input_ids=tiny["ids"])
    return xflex.last_compile_report(), stats


@pytest.fixture(scope="module")
def masked_report(tiny, causal_report):
    """Compile report of the padded batch (HF passes a 4-D bool mask and
    repeat_kv's K/V copies)."""
    with torch.no_grad(), xflex.sparsity(threshold=1.0) as stats:
        tiny["compiled"](input_ids=tiny["batch"], attention_mask=tiny["mask"])
    return xflex.last_compile_report(), stats


def test_plain_prefill_rewrites_every_sdpa_call(causal_report):
    report, stats = causal_report
    print(report)
    assert len(report) == LAYERS
    assert all(entry.rewritten for entry in report), report
    assert all(entry.gqa_unrepeated == 1 for entry in report)  # HF already used enable_gqa
    assert len(stats.sparse_calls) == LAYERS
    assert all(r.key_shape[1] == 2 for r in stats.records)  # 2 KV heads reach the op


def test_masked_prefill_undoes_repeat_kv(masked_report):
    report, stats = masked_report
    print(report)
    assert len(report) == LAYERS
    assert all(entry.rewritten for entry in report), report
    assert all(entry.gqa_unrepeated == 2 for entry in report), "repeat_kv before the masked SDPA was not undone"
    assert len(stats.sparse_calls) == LAYERS
    assert all(r.query_shape[1] == 4 and r.key_shape[1] == 2 for r in stats.records)


@torch.no_grad()
def test_sparsity_off_and_threshold_one_match_eager(tiny, causal_report):
    with xflex.sparsity(enabled=False) as stats:
        off = tiny["compiled"](input_ids=tiny["ids"]).logits
    assert len(stats.dense_calls) == LAYERS and stats.density is None
    assert {r.dense_reason for r in stats.dense_calls} == {"sparsity disabled"}
    _assert_close(off, tiny["expected"], tiny["tolerance"], "sparsity off")
    with xflex.sparsity(threshold=1.0) as stats:
        full = tiny["compiled"](input_ids=tiny["ids"]).logits
    assert len(stats.sparse_calls) == LAYERS and stats.density == 1.0
    _assert_close(full, tiny["expected"], tiny["tolerance"], "threshold 1.0")


@torch.no_grad()
def test_low_threshold_is_sparse_differs_and_never_recompiles(tiny, causal_report):
    with count_xattn_compiles() as compiles, xflex.sparsity(threshold=0.5, stride=16) as stats:
        sparse = tiny["compiled"](input_ids=tiny["ids"]).logits
    diff = (sparse - tiny["expected"]).abs().max().item()
    print(f"threshold 0.5: density {stats.density:.3f}, max logit diff {diff:.3e}")
    assert stats.density < 1.0
    assert diff > 100 * tiny["tolerance"]
    assert compiles.call_count == 0


@torch.no_grad()
def test_left_padded_batch_matches_eager_at_threshold_one(tiny, masked_report):
    keep = tiny["mask"].bool()  # compare real tokens only: padded rows attend to nothing
    with xflex.sparsity(threshold=1.0) as stats:
        out = tiny["compiled"](input_ids=tiny["batch"], attention_mask=tiny["mask"]).logits
    assert len(stats.sparse_calls) == LAYERS and stats.density == 1.0
    _assert_close(out[keep], tiny["expected_batch"][keep], tiny["tolerance"], "left-padded batch")
    with xflex.sparsity(threshold=0.5) as stats:
        sparse = tiny["compiled"](input_ids=tiny["batch"], attention_mask=tiny["mask"]).logits
    assert stats.density < 1.0
    assert torch.isfinite(sparse[keep]).all()


@torch.no_grad()
def test_generate_matches_eager_and_recompiles_no_more_than_dense(tiny):
    """``model.generate`` through an in-place compiled model (``Module.compile``:
    generate calls ``self(...)``, which a ``torch.compile`` wrapper would not
    reach). Decode steps run dense inside the op; graphs compiled for the whole
    generate are counted against a dense ``aot_eager`` compile of the same model."""
    prompt = dict(input_ids=tiny["ids"], attention_mask=torch.ones_like(tiny["ids"]))
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = tiny["model"].generate(**prompt, **greedy)

    torch._dynamo.reset()
    sparse_model = copy.deepcopy(tiny["model"])
    sparse_model.compile(backend="xattn", options=OPTIONS)
    with count_xattn_compiles() as compiles, xflex.sparsity(threshold=1.0) as stats:
        tokens = sparse_model.generate(**prompt, **greedy)
    xattn_graphs = compiles.call_count

    torch._dynamo.reset()
    dense_model = copy.deepcopy(tiny["model"])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    dense_model.compile(backend=counter)
    dense_tokens = dense_model.generate(**prompt, **greedy)
    torch._dynamo.reset()

    print(f"graphs compiled for generate: xattn {xattn_graphs}, dense aot_eager {counter.frame_count}")
    print({r.dense_reason for r in stats.dense_calls})
    assert torch.equal(tokens, expected) and torch.equal(dense_tokens, expected)
    assert len(stats.sparse_calls) == LAYERS  # the prefill
    assert len(stats.dense_calls) == LAYERS * (NEW_TOKENS - 1)  # every decode step
    assert all("decode step" in r.dense_reason for r in stats.dense_calls)
    assert xattn_graphs <= counter.frame_count


# ----------------------------------------------------- SmolLM2-135M (real) ---

SMOLLM2_OPTIONS = {"block_size": 64, "min_seq_len": 128, "dense_row_blocks": 0}
SMOLLM2_TOKENS = 300


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    from xflex import demo

    torch._dynamo.reset()  # the tiny model's graphs share LlamaForCausalLM.forward's recompile budget
    model, tokenizer = smollm2_model
    ids = tokenizer(demo.DEFAULT_TEXT.read_text(), return_tensors="pt").input_ids[:, :SMOLLM2_TOKENS]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    tolerance = 4 * _fp32_error(model, input_ids=ids)
    compiled = torch.compile(model, backend="xattn", options=SMOLLM2_OPTIONS)
    yield dict(compiled=compiled, ids=ids, expected=expected, tolerance=tolerance, tokenizer=tokenizer)
    torch._dynamo.reset()


@torch.no_grad()
def test_smollm2_threshold_one_matches_eager(smollm2):
    with xflex.sparsity(threshold=1.0) as stats:
        logits = smollm2["compiled"](input_ids=smollm2["ids"]).logits
    assert len(stats.sparse_calls) == 30 and stats.density == 1.0
    assert all(entry.rewritten for entry in xflex.last_compile_report())
    _assert_close(logits, smollm2["expected"], smollm2["tolerance"], "SmolLM2 threshold 1.0")


@torch.no_grad()
def test_smollm2_threshold_point_nine_is_sparse_and_mostly_agrees(smollm2):
    with count_xattn_compiles() as compiles, xflex.sparsity(threshold=0.9, stride=8) as stats:
        logits = smollm2["compiled"](input_ids=smollm2["ids"]).logits
    agree = (logits.argmax(-1) == smollm2["expected"].argmax(-1)).float().mean().item()
    ppl = lambda x: math.exp(torch.nn.functional.cross_entropy(x[0, :-1], smollm2["ids"][0, 1:]).item())  # noqa: E731
    print(f"density {stats.density:.3f}, greedy next-token agreement {agree:.3f}, "
          f"perplexity {ppl(logits):.3f} vs dense {ppl(smollm2['expected']):.3f}")
    assert stats.density < 1.0
    assert agree >= 0.8
    assert compiles.call_count == 0


# ------------------------------------------------------ `xflex demo` parts ---


def test_demo_prompt_hides_the_fact_at_its_depth(smollm2):
    from xflex import demo

    prompt = demo.build_prompt(smollm2["tokenizer"], tokens=600, depth=0.25, seed=3)
    ids, labels = prompt.input_ids[0], prompt.labels[0]
    text = labels != -100
    assert ids.shape[0] <= 600 and int(text.sum()) == prompt.text_tokens
    assert torch.equal(ids[text], labels[text])  # loss only on the text, fact included
    decoded = smollm2["tokenizer"].decode(ids[text])
    assert prompt.fact in decoded
    depth = decoded.index(prompt.fact) / len(decoded)
    assert abs(depth - 0.25) < 0.05, depth
    assert prompt.retrieved(f" {prompt.passphrase[0].title()} {prompt.passphrase[1]}.")
    assert not prompt.retrieved(" I do not know.")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--stride", "7"], "--stride must divide"),
        (["demo", "--threshold", "0"], "--threshold must be in (0, 1]"),
        (["demo", "--tokens", "9000"], "must fit SmolLM2's context"),
        (["demo", "--threshold-by-call", '{"model.layers.3.*": 2}'], "threshold_by_call"),
        (["demo", "--threshold-by-call", "[0.9]"], "expected a JSON object"),
    ],
)
def test_demo_cli_rejects_bad_options_before_loading(argv, message, capsys):
    from xflex.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
