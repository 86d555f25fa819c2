"""Per layer, what each selection setting does to one accuracy-harness prompt
of SmolLM2-135M: the attention output's error against dense SDPA (on the
layer's own dense inputs, so errors do not compound), over every row and on
the rows of the hidden fact, and the density. Investigates why a setting
loses a retrieval that another keeps (bench/RESULTS.md, "Slash lines and the
union of two estimates").

    python -m bench.tools.prompt_layers --text gpl3 --tokens 7000 --depth 0.5 --reductions mean max mean+max
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import xflex
from bench import texts
from bench.selection_quality import captured_attention_inputs
from xflex import demo


def fact_span(prompt: demo.Prompt, tokenizer) -> slice:
    """The token positions of the prompt's hidden fact."""
    fact = tokenizer(prompt.fact, add_special_tokens=False).input_ids[:-1]  # the final "." may merge with "\\n"
    ids = prompt.input_ids[0].tolist()
    start = next(i for i in range(len(ids)) if ids[i : i + len(fact)] == fact)
    return slice(start, start + len(fact))


def layer_errors(calls: list[tuple], config: xflex.Config, fact: slice) -> list[dict[str, float]]:
    """Per call: relative L2 error of each output row against dense SDPA
    (mean, 99th percentile, max over the fact's rows) and the density."""
    rows = []
    for q, k, v, mask, causal, scale in calls:
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        plan = xflex.plan(q, k, attn_mask=mask, is_causal=causal, scale=scale, config=config)
        error = (plan.attend(q, k, v) - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-30)
        density = (plan.selected.sum() / plan.visible.expand_as(plan.selected).sum()).item()
        rows.append(dict(mean=error.mean().item(), p99=error.flatten().quantile(0.99).item(), fact=error[..., fact].max().item(), density=density))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default="gpl3", choices=list(texts.TEXTS))
    parser.add_argument("--tokens", type=int, default=7000)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="passphrase seed")
    parser.add_argument("--threshold", type=float, default=xflex.Config.threshold)
    parser.add_argument("--reductions", nargs="+", default=["mean", "max"], help="scoring_reduction values to compare")
    args = parser.parse_args(argv)
    model, tokenizer = demo.load_smollm2(torch.device("cpu"), torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = texts.write_to(args.text, Path(folder))
        prompt = demo.build_prompt(tokenizer, tokens=args.tokens, depth=args.depth, seed=args.seed, text_path=path)
    fact = fact_span(prompt, tokenizer)
    with torch.no_grad(), captured_attention_inputs() as calls:
        model(prompt.input_ids)
    base = xflex.Config(block_size=128, min_seq_len=0, threshold=args.threshold)
    with torch.no_grad():
        errors = {r: layer_errors(calls, dataclasses.replace(base, scoring_reduction=r), fact) for r in args.reductions}
    print(f"{args.text}, {prompt.input_ids.shape[1]} tokens, fact at tokens {fact.start}-{fact.stop - 1}, tau {args.threshold}")
    print("| layer | " + " | ".join(f"{r}: error mean / p99 / fact rows max, density" for r in args.reductions) + " |")
    print("|---:|" + "---|" * len(args.reductions))
    for layer in range(len(calls)):
        cells = [f"{e['mean']:.4f} / {e['p99']:.3f} / {e['fact']:.3f}, {e['density']:.3f}" for e in (errors[r][layer] for r in args.reductions)]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
