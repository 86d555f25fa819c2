"""diffusers video transformers under `backend="xattn"`: Wan 2.1, CogVideoX,
HunyuanVideo and Flux, each built tiny from its config. Every attention call is
rewritten or falls back for a stated reason, dense equals eager, low thresholds
select blocks in joint text+video attention, and `xflex.dense_warmup` runs a
denoising loop dense-then-sparse without recompiling.

How these models reach SDPA (diffusers 0.42.1, torch 2.13): Wan, HunyuanVideo
and Flux call ``diffusers.models.attention_dispatch.dispatch_attention_fn``,
whose default "native" backend calls ``F.scaled_dot_product_attention`` on
``(B, H, L, D)`` permutes of ``(B, L, H, D)`` tensors; dynamo traces through the
dispatcher, so SDPA is a plain node of the graph. CogVideoX (and HunyuanVideo's
text token refiner) use ``CogVideoXAttnProcessor2_0`` / ``AttnProcessor2_0``,
which call ``F.scaled_dot_product_attention`` directly. Each model compiles to
one graph (no graph breaks).

Call sites (B: batch, T: text tokens, N: video/image tokens):

======================= =============================== ============ ===========================
model                   call                            kind         attn_mask
======================= =============================== ============ ===========================
Wan 2.1 (T2V)           blocks.i.attn1                  self (N)     none
                        blocks.i.attn2                  cross (N->T) none (text zero-padded)
CogVideoX               transformer_blocks.i.attn1      joint [T, N] none
HunyuanVideo            ...token_refiner...attn         self (T)     bool (B, H, T, T)
                        transformer_blocks.i.attn       joint [N, T] bool (B, 1, 1, N+T): padding
                        single_transformer_blocks.i.attn joint [N, T] same mask
Flux                    transformer_blocks.i.attn       joint [T, N] none
                        single_transformer_blocks.i.attn joint [T, N] none
======================= =============================== ============ ===========================

Text tokens in joint attention are not special to xflex: they are blocks like
any other. Each query block, text or video, keeps its own diagonal block and
then the highest-scoring key blocks until tau; text key blocks compete with
video key blocks on score. Measured at tau 0.5 (random weights, so the numbers
only show that nothing forces text blocks either way; printed with -s): text
query rows keep 0.46-0.49 of their visible blocks (call densities 0.44-0.50),
and video query rows keep each pure-text key block 0.38-0.98 of the time. So
text blocks do NOT stay dense. Padded text keys (HunyuanVideo's mask) are
invisible: never computed, not counted. No call here is causal: HunyuanVideo's
joint mask has no query axis, and its text refiner's mask over (query, key)
pairs shows real queries the keys after them, so no call keeps key block 0 as
a sink (``tests/test_joint_attention.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from models import count_xattn_compiles

import xflex
import xflex.op

diffusers = pytest.importorskip("diffusers", reason="needs diffusers (pip install xflex[video])")

pytestmark = pytest.mark.slow

# 32-token blocks give each model 16-18 blocks per row. min_seq_len=128 keeps
# the text-only calls (64 text tokens, e.g. HunyuanVideo's token refiner, Wan's
# cross-attention keys) dense, as the default min_seq_len=1024 does at real
# sizes (256-512 text tokens), while the 496-576-token video calls run sparse.
# dense_row_blocks=0: rows see 16-18 blocks, which the default (16) would
# mostly keep whole; these tests are about the threshold cut.
OPTIONS = {"block_size": 32, "min_seq_len": 128, "dense_row_blocks": 0}
BLOCK = OPTIONS["block_size"]
TEXT = 64  # text tokens of the joint models
# Inductor reorders fp32 reductions (norms, matmuls): measured max |diff| to
# eager <= 4e-6 on these models.
TOL = dict(rtol=1e-4, atol=1e-4)


@dataclasses.dataclass(frozen=True)
class Site:
    """What one SDPA call site is and what xflex does with it at run time."""

    kind: str  # "self", "cross", "joint" or "text self"
    mask: str | None  # attn_mask the model passes: None, or its dtype and shape
    dense_reason: str | None  # the run-time fallback at default settings, None: sparse
    text: tuple[int, int] | None = None  # text token span [start, stop) of a joint call


@dataclasses.dataclass
class Case:
    build: Callable[[], tuple[torch.nn.Module, dict[str, object]]]
    sites: dict[str, Site]


def _wan() -> tuple[torch.nn.Module, dict[str, object]]:
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=1,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    # 5 latent frames of 20x20, 2x2 patches: 500 video tokens; 24 text tokens.
    inputs = dict(
        hidden_states=torch.randn(1, 4, 5, 20, 20),
        timestep=torch.tensor([999]),
        encoder_hidden_states=torch.randn(1, 24, 32),
    )
    return model, inputs


def _cogvideox() -> tuple[torch.nn.Module, dict[str, object]]:
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=32,
        num_layers=1,
        sample_width=24,
        sample_height=24,
        sample_frames=9,  # 3 latent frames after 4x temporal compression
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT,
    )
    # Batch 2: the CogVideoX pipeline batches classifier-free guidance.
    # 3 frames of 12x12 patches: 432 video tokens after 64 text tokens.
    inputs = dict(
        hidden_states=torch.randn(2, 3, 4, 24, 24),
        encoder_hidden_states=torch.randn(2, TEXT, 32),
        timestep=torch.tensor([999, 999]),
    )
    return model, inputs


def _hunyuan_video() -> tuple[torch.nn.Module, dict[str, object]]:
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=32,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    )
    # 432 video tokens then 64 text tokens; prompts of 48 and 60 tokens padded to 64.
    text_mask = torch.ones(2, TEXT, dtype=torch.long)
    text_mask[0, 48:] = 0
    text_mask[1, 60:] = 0
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 24, 24),
        timestep=torch.tensor([999, 999]),
        encoder_hidden_states=torch.randn(2, TEXT, 32),
        encoder_attention_mask=text_mask,
        pooled_projections=torch.randn(2, 16),
        guidance=torch.tensor([6000.0, 6000.0]),
    )
    return model, inputs


def _flux() -> tuple[torch.nn.Module, dict[str, object]]:
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 6, 6),
    )
    # A 16x32 latent image: 512 image tokens after 64 text tokens.
    height, width = 16, 32
    img_ids = torch.zeros(height * width, 3)
    img_ids[:, 1] = torch.arange(height * width) // width
    img_ids[:, 2] = torch.arange(height * width) % width
    inputs = dict(
        hidden_states=torch.randn(1, height * width, 4),
        encoder_hidden_states=torch.randn(1, TEXT, 32),
        pooled_projections=torch.randn(1, 16),
        timestep=torch.tensor([1.0]),
        img_ids=img_ids,
        txt_ids=torch.zeros(TEXT, 3),
    )
    return model, inputs


_SHORT_TEXT = "below min_seq_len=128"
CASES = {
    "wan": Case(
        _wan,
        {
            "blocks.0.attn1": Site("self", None, None),
            # Wan pads prompts to 512 tokens with zeros and passes no mask.
            "blocks.0.attn2": Site("cross", None, f"key length 24 {_SHORT_TEXT}"),
        },
    ),
    "cogvideox": Case(
        _cogvideox,
        {"transformer_blocks.0.attn1": Site("joint", None, None, text=(0, TEXT))},
    ),
    "hunyuan_video": Case(
        _hunyuan_video,
        {
            "context_embedder.token_refiner.refiner_blocks.0.attn": Site(
                "text self", "torch.bool (2, 2, 64, 64)", f"key length 64 {_SHORT_TEXT}"
            ),
            "transformer_blocks.0.attn": Site("joint", "torch.bool (2, 1, 1, 496)", None, text=(432, 432 + TEXT)),
            "single_transformer_blocks.0.attn": Site("joint", "torch.bool (2, 1, 1, 496)", None, text=(432, 432 + TEXT)),
        },
    ),
    "flux": Case(
        _flux,
        {
            "transformer_blocks.0.attn": Site("joint", None, None, text=(0, TEXT)),
            "single_transformer_blocks.0.attn": Site("joint", None, None, text=(0, TEXT)),
        },
    ),
}


@dataclasses.dataclass
class Compiled:
    case: Case
    model: torch.nn.Module  # eager
    compiled: torch.nn.Module
    inputs: dict[str, object]
    expected: torch.Tensor  # eager output
    eager_masks: list[str | None]  # attn_mask of each eager SDPA call
    report: list[xflex.CompiledCall]  # xflex.last_compile_report() right after compiling
    graphs: int  # graphs the xattn backend compiled for the model
    first_call: xflex.SparsityStats  # the compiling call, at default settings

    def __call__(self, **overrides: object) -> torch.Tensor:
        return self.compiled(**{**self.inputs, **overrides}, return_dict=False)[0]


@contextlib.contextmanager
def _spy_sdpa() -> Iterator[list[str | None]]:
    """Record the attn_mask of each eager ``F.scaled_dot_product_attention`` call."""
    masks: list[str | None] = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        masks.append(None if attn_mask is None else f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
        return original(query, key, value, attn_mask, *args, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", spy):
        yield masks


@contextlib.contextmanager
def _recorded_selections() -> Iterator[list[tuple[object, torch.Tensor]]]:
    """Record ``(pattern, selected)`` of each sparse call, in call order."""
    seen: list[tuple[object, torch.Tensor]] = []
    original = xflex.op.plan

    def spy(*args, **kwargs):
        call_plan = original(*args, **kwargs)
        seen.append((call_plan.pattern, call_plan.selected))
        return call_plan

    with mock.patch.object(xflex.op, "plan", spy):
        yield seen


@pytest.fixture(scope="module")
def compiled_models() -> Iterator[Callable[[str], Compiled]]:
    """Each model built, run eagerly and compiled once, on first use."""
    torch._dynamo.reset()
    cache: dict[str, Compiled] = {}

    @torch.no_grad()
    def get(name: str) -> Compiled:
        if name not in cache:
            case = CASES[name]
            torch.manual_seed(0)
            model, inputs = case.build()
            model.eval()
            with _spy_sdpa() as masks:
                expected = model(**inputs, return_dict=False)[0]
            compiled = torch.compile(model, backend="xattn", options=OPTIONS)
            with count_xattn_compiles() as compiles, xflex.sparsity() as stats:
                compiled(**inputs, return_dict=False)
            report = xflex.last_compile_report()
            cache[name] = Compiled(case, model, compiled, inputs, expected, masks, report, compiles.call_count, stats)
        return cache[name]

    yield get
    torch._dynamo.reset()


def _max_mean_diff(actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual - expected).abs()
    return f"max |diff| {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_every_attention_call_is_accounted_for(compiled_models, name):
    """One graph; every SDPA call site rewritten to the xflex op; at run time
    each runs sparse or dense for its stated reason; masks as documented."""
    model = compiled_models(name)
    sites = model.case.sites
    assert model.graphs == 1, f"{name} compiled to {model.graphs} graphs (graph breaks?)"
    assert [entry.name for entry in model.report] == list(sites)
    assert all(entry.rewritten for entry in model.report), model.report
    assert model.eager_masks == [site.mask for site in sites.values()]
    records = model.first_call.records
    assert [r.name for r in records] == list(sites)
    for record, (site_name, site) in zip(records, sites.items()):
        if site.dense_reason is None:
            assert record.sparse, f"{site_name} ran dense: {record.dense_reason}"
        else:
            assert record.dense_reason == site.dense_reason, site_name


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_sparsity_off_and_threshold_one_match_eager(compiled_models, name):
    model = compiled_models(name)
    with xflex.sparsity(enabled=False) as stats:
        off = model()
    assert {r.dense_reason for r in stats.records} == {"sparsity disabled"}
    print(f"{name} sparsity off: {_max_mean_diff(off, model.expected)}")
    torch.testing.assert_close(off, model.expected, **TOL)

    with xflex.sparsity(threshold=1.0) as stats:
        full = model()
    eligible = [n for n, site in model.case.sites.items() if site.dense_reason is None]
    assert [r.name for r in stats.sparse_calls] == eligible
    assert stats.density == 1.0
    print(f"{name} threshold 1.0: {_max_mean_diff(full, model.expected)}")
    torch.testing.assert_close(full, model.expected, **TOL)


def _blocks(span: tuple[int, int], length: int, *, inside: bool) -> list[int]:
    """Blocks whose tokens all lie in ``span`` (inside=True), or that hold no
    token of it (inside=False)."""
    out = []
    for b in range(-(-length // BLOCK)):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, length)
        within, apart = span[0] <= lo and hi <= span[1], hi <= span[0] or lo >= span[1]
        if (within if inside else apart):
            out.append(b)
    return out


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_low_threshold_selects_blocks(compiled_models, name):
    """tau 0.5: every eligible call computes fewer blocks than visible, each
    query block keeps its own (diagonal) block, text blocks are selected like
    any other (neither forced nor excluded), the output stays finite."""
    model = compiled_models(name)
    with (
        count_xattn_compiles() as compiles,
        _recorded_selections() as selections,
        xflex.sparsity(threshold=0.5) as stats,
    ):
        sparse = model()
    assert compiles.call_count == 0
    assert torch.isfinite(sparse).all()
    print(f"{name} threshold 0.5: {_max_mean_diff(sparse, model.expected)}, density {stats.density:.3f}")
    records = stats.sparse_calls
    text_key_kept = []
    assert len(records) == len(selections) == sum(site.dense_reason is None for site in model.case.sites.values())
    for record, (pattern, selected) in zip(records, selections):
        site = model.case.sites[record.name]
        density = stats.density_by_call()[record.name]
        assert 0 < density < 1, f"{record.name}: density {density}"
        visible = pattern.visibility.any.expand_as(selected)
        assert not (selected & ~visible).any()
        diagonal = torch.eye(selected.shape[2], selected.shape[3], dtype=torch.bool)
        # Wherever visible: HunyuanVideo's all-padding last block is masked out.
        assert (selected | ~visible)[..., diagonal].all(), f"{record.name}: a query block lost its own block"
        if site.text is None:
            continue
        length = record.query_shape[2]
        text_blocks = _blocks(site.text, length, inside=True)
        video_blocks = _blocks(site.text, length, inside=False)
        text_rows = selected[:, :, text_blocks].sum() / visible[:, :, text_blocks].sum()
        text_cols = selected[:, :, video_blocks][..., text_blocks].sum() / visible[:, :, video_blocks][..., text_blocks].sum()
        sink = selected[..., 0].float().mean()
        print(
            f"{name} {record.name}: text blocks {text_blocks} of {selected.shape[2]}; "
            f"text query rows keep {text_rows:.2f} of visible blocks; "
            f"video query rows keep the text key blocks {text_cols:.2f} of the time; "
            f"key block 0 kept by {sink:.2f} of rows; call density {density:.2f}"
        )
        assert 0 < text_rows < 1, "text query blocks are selected like any other: not dense"
        assert text_cols > 0, "text key blocks are selected like any other: not excluded"
        text_key_kept.append(text_cols)
    if text_key_kept:  # ... nor forced: some video query rows drop them
        assert sum(text_key_kept) / len(text_key_kept) < 1


# Where the joint calls hold their text (the token refiner, text only, runs dense).
TEXT_TOKENS = {"cogvideox": TEXT, "hunyuan_video": -TEXT, "flux": TEXT}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", list(TEXT_TOKENS))
@torch.no_grad()
def test_text_tokens_by_call_keeps_text_blocks_dense(compiled_models, name):
    """``text_tokens_by_call``: in every joint call, a query block holding a
    text token keeps all its visible key blocks, and every query block keeps
    the visible key blocks holding one; no recompile. Prints the output's
    relative error against eager with and without it (random weights: the
    README's measurement, with ``-s``)."""
    model = compiled_models(name)
    text = {"*transformer_blocks.*": TEXT_TOKENS[name]}
    recorded = {}
    for tau in (0.5, 0.8, 0.95):
        with xflex.sparsity(threshold=tau) as plain:
            error = _relative_error(model(), model.expected)
        with count_xattn_compiles() as compiles, _recorded_selections() as selections, xflex.sparsity(
            threshold=tau, text_tokens_by_call=text
        ) as stats:
            dense_text_error = _relative_error(model(), model.expected)
        print(
            f"{name} tau {tau}: relative error {error:.4f} at density {plain.density:.3f}; "
            f"text dense: {dense_text_error:.4f} at {stats.density:.3f}"
        )
        assert compiles.call_count == 0
        recorded[tau] = list(zip(stats.sparse_calls, selections))
    for tau, calls in recorded.items():
        for record, (pattern, selected) in calls:
            site = model.case.sites[record.name]
            length = record.query_shape[2]
            holding_text = [b for b in range(-(-length // BLOCK)) if b not in _blocks(site.text, length, inside=False)]
            visible = pattern.visibility.any.expand_as(selected)
            assert torch.equal(selected[:, :, holding_text], visible[:, :, holding_text]), record.name
            assert torch.equal(selected[..., holding_text], visible[..., holding_text]), record.name
            if tau == 0.5:  # the lowest threshold still cuts video blocks
                assert not torch.equal(selected, visible), f"{record.name}: the video blocks are no longer cut"


def test_diffusers_takes_no_new_attention_backend_through_public_api():
    """Why xflex registers no diffusers attention backend (README): a backend
    is an ``AttentionBackendName`` member, which public API cannot add. If
    this fails, diffusers has opened its registry: register xflex there."""
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

    with pytest.raises(ValueError):
        AttentionBackendName("xattn")
    with pytest.raises(ValueError, match="not registered"):
        with attention_backend("xattn"):
            pass
    model, _ = _wan()
    with pytest.raises(ValueError, match="must be one of"):
        model.set_attention_backend("xattn")


class _Denoiser(torch.nn.Module):
    """Stands in for a transformer when no compile is needed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enabled = xflex.context.effective_config(xflex.Config()).enabled
        if x.sum() < 0:
            raise RuntimeError("boom")
        return torch.tensor(enabled)


def test_dense_warmup_counts_calls_and_removes_its_hooks():
    module = _Denoiser()
    with xflex.dense_warmup(module, steps=2, calls_per_step=2) as warmup:
        ran = [bool(module(torch.ones(1))) for _ in range(5)]
        assert warmup.step == 2 and not warmup.warming_up
    assert ran == [False] * 4 + [True]
    assert (warmup.dense_calls, warmup.sparse_calls, warmup.warmup_calls) == (4, 1, 4)
    assert not module._forward_pre_hooks and not module._forward_hooks
    assert bool(module(torch.ones(1)))  # no warmup outside the block


def test_dense_warmup_restores_settings_when_a_call_raises():
    module = _Denoiser()
    with xflex.dense_warmup(module, steps=1):
        with pytest.raises(RuntimeError, match="boom"):
            module(-torch.ones(1))
        assert xflex.context.effective_config(xflex.Config()).enabled
        assert bool(module(torch.ones(1)))  # the failed call counted as the warmup step


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=-1), ValueError, "'steps' must be an int >= 0, but got -1"),
        (dict(steps=1.5), TypeError, "'steps' must be an int >= 0, but got 1.5"),
        (dict(steps=True), TypeError, "'steps'"),
        (dict(steps=2, calls_per_step=0), ValueError, "'calls_per_step' must be an int >= 1, but got 0"),
        (dict(steps=2, calls_per_step=None), TypeError, "'calls_per_step'"),
    ],
)
def test_dense_warmup_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        with xflex.dense_warmup(_Denoiser(), **kwargs):
            pass


def test_dense_warmup_needs_a_module():
    with pytest.raises(TypeError, match="'module' must be a torch.nn.Module"):
        with xflex.dense_warmup(lambda x: x, steps=1):
            pass


@pytest.mark.parametrize("hooked", ["compiled", "module"])
@torch.no_grad()
def test_dense_warmup_in_a_denoising_loop(compiled_models, hooked):
    """Wan-pipeline-like loop: 4 steps, conditional and unconditional calls per
    step (as WanPipeline does with guidance), changing timestep tensors. The
    first 2 steps run dense, the rest sparse; nothing recompiles. Hooks on the
    OptimizedModule or on the module it wraps both run outside the graph."""
    wan = compiled_models("wan")
    target = wan.compiled if hooked == "compiled" else wan.model
    latents = wan.inputs["hidden_states"].clone()
    text = wan.inputs["encoder_hidden_states"]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with (
        count_xattn_compiles() as compiles,
        xflex.sparsity(threshold=0.5) as stats,
        xflex.dense_warmup(target, steps=2, calls_per_step=2) as warmup,
    ):
        for t in (999, 749, 499, 249):
            timestep = torch.tensor([t])
            cond = wan(hidden_states=latents, timestep=timestep, encoder_hidden_states=text)
            uncond = wan(hidden_states=latents, timestep=timestep, encoder_hidden_states=torch.zeros_like(text))
            latents = latents - 0.2 * (uncond + 5.0 * (cond - uncond))
    assert (warmup.dense_calls, warmup.sparse_calls) == (4, 4)
    self_attention = [r for r in stats.records if r.name == "blocks.0.attn1"]
    assert [r.dense_reason for r in self_attention] == ["sparsity disabled"] * 4 + [None] * 4
    assert all(r.dense_reason is not None for r in stats.records if r.name == "blocks.0.attn2")
    assert stats.density < 1
    assert torch.isfinite(latents).all()
    assert compiles.call_count == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not target._forward_pre_hooks and not target._forward_hooks
