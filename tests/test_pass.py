"""The FX pass on dynamo graphs: every SDPA form is found, arguments are
normalised, repeat_kv is undone; the rewritten graph runs like the original
(STYLE item 8)."""

import operator

import torch
import torch.nn.functional as F

from xflex.passes import SDPA_TARGETS, find_sdpa_calls, repeated_source, rewrite_sdpa


def _capture(fn, *inputs):
    """The dynamo FX graph of ``fn`` (and the result of running it)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return graphs[0]


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def model(q, k, v, mask):
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = torch._C._nn.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.5)
    c = F.scaled_dot_product_attention(q, repeat_kv(k[:, :1], 2), repeat_kv(v[:, :1], 2), attn_mask=mask)
    return a + b + c


def _inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    mask = torch.rand(40, 40) > 0.3
    return q, k, v, mask


def test_finds_every_form_and_binds_arguments():
    gm = _capture(model, *_inputs())
    calls = find_sdpa_calls(gm.graph)
    assert len(calls) == 3
    assert calls[0].is_causal is True and calls[0].attn_mask is None
    assert calls[1].scale == 0.5 and calls[1].attn_mask is not None and calls[1].is_causal is False
    assert calls[2].unrepeated == 2 and calls[2].enable_gqa is True
    assert calls[2].example("key").shape[1] == 1  # the key before repeat_kv
    assert len({c.name for c in calls}) == 3


def test_repeat_kv_needs_matching_shapes():
    gm = _capture(lambda k: repeat_kv(k, 3) * 1, torch.randn(1, 2, 5, 4))
    reshape = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape")
    source, factor = repeated_source(reshape)
    assert factor == 3 and source.op == "placeholder"
    unrelated = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.mul)
    assert repeated_source(unrelated) is None


def test_rewritten_graph_runs_like_the_original():
    """Rewrite into a plain-torch attention written here; run both graphs."""
    inputs = _inputs()
    gm = _capture(model, *inputs)
    expected = gm(*inputs)

    def my_attention(q, k, v, mask, is_causal, scale, enable_gqa):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )

    def replace(graph, call):
        args = (call.query, call.key, call.value, call.attn_mask, call.is_causal, call.scale, call.enable_gqa)
        return graph.call_function(my_attention, args)

    report = rewrite_sdpa(gm, replace)
    assert [rewritten for _, rewritten in report] == [True, True, True]
    assert not any(n.op == "call_function" and n.target in SDPA_TARGETS for n in gm.graph.nodes)
    # repeat_kv's expand/reshape are gone: the call reads the 1-head K/V.
    assert not any(n.op == "call_method" and n.target == "expand" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*inputs), expected)


def test_replacement_can_leave_a_call_alone():
    inputs = _inputs()
    gm = _capture(model, *inputs)
    report = rewrite_sdpa(gm, lambda graph, call: None)
    assert [rewritten for _, rewritten in report] == [False, False, False]
    assert sum(n.op == "call_function" and n.target in SDPA_TARGETS for n in gm.graph.nodes) == 3
