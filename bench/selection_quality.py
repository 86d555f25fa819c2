"""Selection quality on real attention: for every layer of SmolLM2-135M on
~7K tokens of real text, how much of the true attention mass the selected
blocks hold (recall) and how many blocks they take (density), against the
oracle (the fewest blocks whose true mass reaches tau).

Recall and oracle are exact on sampled query blocks (true softmax rows over
all keys). Variants change the selection rules or the scorer's softmax
temperature, so their numbers can be compared side by side.

    python bench/selection_quality.py [--tokens 7000] [--samples 12] [--out table.md]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch
import torch.nn.functional as F

import xflex
from xflex import demo
from xflex.op import plan_blocks


@contextlib.contextmanager
def captured_attention_inputs():
    """Record (q, k, scale) of every SDPA call made inside the block (eager)."""
    calls = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((q.detach(), k.detach(), attn_mask, is_causal, scale))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def true_block_mass(q, k, scale, block_size, q_blocks):
    """``(H, len(q_blocks), nK)``: each sampled query block's true attention mass
    per key block (causal), rows normalised to 1."""
    H, L = q.shape[1], q.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)[0].float()
    n_k = math.ceil(L / block_size)
    out = torch.zeros(H, len(q_blocks), n_k)
    for row, i in enumerate(q_blocks):
        lo, hi = i * block_size, min(L, (i + 1) * block_size)
        logits = (q[0, :, lo:hi].float() @ k.transpose(-1, -2)) * scale
        positions = torch.arange(lo, hi)[:, None]
        logits = logits.masked_fill(torch.arange(L)[None, :] > positions, float("-inf"))
        probs = torch.softmax(logits, -1)
        padded = F.pad(probs, (0, n_k * block_size - L))
        out[:, row] = padded.view(H, hi - lo, n_k, block_size).sum((1, 3)) / (hi - lo)
    return out


def oracle_counts(mass: torch.Tensor, tau: float) -> torch.Tensor:
    ranked = mass.sort(-1, descending=True).values
    before = ranked.cumsum(-1) - ranked
    return (before < tau).sum(-1)


VARIANTS = {
    "tau0.9 S8": (dict(threshold=0.9, stride=8), 1.0),
    "tau0.9 S16": (dict(threshold=0.9, stride=16), 1.0),
    "tau0.9 S8 temp x0.5": (dict(threshold=0.9, stride=8), 0.5),
    "tau0.9 S8 temp x0.7": (dict(threshold=0.9, stride=8), 0.7),
    "tau0.9 S8 temp x0.8": (dict(threshold=0.9, stride=8), 0.8),
    "tau0.9 S16 temp x0.7": (dict(threshold=0.9, stride=16), 0.7),
    "tau0.9 S8 temp x2": (dict(threshold=0.9, stride=8), 2.0),
    "tau0.9 S8 recent 256": (dict(threshold=0.9, stride=8, keep_recent=256), 1.0),
    "tau0.95 S8": (dict(threshold=0.95, stride=8), 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=7000)
    parser.add_argument("--samples", type=int, default=12, help="query blocks sampled per layer")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    demo.log("loading SmolLM2-135M-Instruct")
    model, tokenizer = demo.load_smollm2(torch.device("cpu"), torch.float32)
    text = demo.DEFAULT_TEXT.read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    demo.log(f"capturing q/k of every layer on {ids.shape[1]} tokens")
    with torch.no_grad(), captured_attention_inputs() as calls:
        model(ids)
    L = ids.shape[1]
    n_q = math.ceil(L / args.block_size)
    q_blocks = sorted(set(torch.linspace(2, n_q - 1, args.samples).round().long().tolist()))
    results = {name: [] for name in VARIANTS}
    oracle = []
    for layer, (q, k, mask, is_causal, scale) in enumerate(calls):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        mass = true_block_mass(q, k, scale, args.block_size, q_blocks)
        visible = torch.tensor([i + 1 for i in q_blocks], dtype=torch.float32)
        oracle.append((oracle_counts(mass, 0.9).float() / visible).mean().item())
        for name, (settings, temperature) in VARIANTS.items():
            config = xflex.Config(block_size=args.block_size, **settings)
            # Only the scorer sees the scale: scaling it is a scorer temperature.
            chosen = plan_blocks(q, k, None, True, scale * temperature, config)[1].selected[0][:, q_blocks]
            recall = (mass * chosen).sum(-1).mean().item()
            density = (chosen.sum(-1).float() / visible).mean().item()
            results[name].append((recall, density))
        demo.log(f"layer {layer}: oracle {oracle[-1]:.3f} " + " ".join(f"{n}={r[-1][0]:.2f}/{r[-1][1]:.2f}" for n, r in results.items()))
    lines = ["| variant | mean recall | min recall (layer) | recall layers 3-10 | density (sampled rows) | oracle density tau 0.9 |", "|---|---|---|---|---|---|"]
    mean_oracle = sum(oracle) / len(oracle)
    for name, rows in results.items():
        recalls = [r for r, _ in rows]
        worst = min(range(len(recalls)), key=recalls.__getitem__)
        mid = recalls[3:11]
        lines.append(
            f"| {name} | {sum(recalls) / len(recalls):.3f} | {recalls[worst]:.3f} ({worst}) | {min(mid):.2f}-{max(mid):.2f} "
            f"| {sum(d for _, d in rows) / len(rows):.3f} | {mean_oracle:.3f} |"
        )
    table = "\n".join(lines)
    print(f"SmolLM2-135M, {L} tokens of GPL-3, {len(calls)} layers, {len(q_blocks)} sampled query blocks per layer")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
