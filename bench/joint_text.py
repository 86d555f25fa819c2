"""Joint text + video attention: does keeping the text blocks dense
(``text_tokens_by_call``) buy accuracy? Output error against dense attention,
with and without it, at each threshold, on the ``video`` family of
``xflex/benchmark/inputs.py`` with text tokens joined to it (leading, as Flux and
CogVideoX place them; ``--side trailing`` as HunyuanVideo).

The text tokens are the prompt every video token is conditioned on: per head
a text direction that every video query leans to, so that each text key gets
a logit bonus of ``--text-bonus`` from every video query (drawn from 0.5-1x
per key), and per head a few "hot" text keys (the subject words) with
``--hot-bonus`` more, which block averages dilute. Text queries attend the
text keys the same way and the video keys without structure.

    python -m bench.joint_text                                  # CPU, ~2 min
    python -m bench.joint_text --text-bonus 0 4 8 --hot-bonus 0 6 --side trailing
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import torch.nn.functional as F

import xflex
from xflex.benchmark.inputs import video_like_inputs

CALL = "joint"


def joint_inputs(
    frames: int, text: int, *, heads: int, head_dim: int, text_bonus: float, hot_bonus: float, side: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)`` fp32 on the CPU: ``frames`` video frames of 256 tokens and
    ``text`` text tokens, before them (``side="leading"``) or after."""
    q_video, k_video, v = video_like_inputs(
        frames * 256, heads=heads, kv_heads=heads, head_dim=head_dim, device="cpu", dtype=torch.float32, seed=seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    q_text = 0.3 * torch.randn(1, heads, text, head_dim, generator=gen)
    k_text = 0.3 * torch.randn(1, heads, text, head_dim, generator=gen)
    v_text = torch.randn(1, heads, text, head_dim, generator=gen)
    # A query part u * D^(1/4) and a key part b * u * D^(1/4) add b to q.k/sqrt(D).
    root = head_dim**0.25
    direction = F.normalize(torch.randn(1, heads, 1, head_dim, generator=gen), dim=-1)
    bonus = text_bonus * (0.5 + 0.5 * torch.rand(1, heads, text, 1, generator=gen))
    hot = torch.rand(1, heads, text, 1, generator=gen).argsort(2) < 4  # 4 hot keys per head
    k_text = k_text + (bonus + hot_bonus * hot) * root * direction
    q_video = q_video + root * direction
    q_text = q_text + root * direction
    parts = [(q_text, k_text, v_text), (q_video, k_video, v)]
    if side == "trailing":
        parts.reverse()
    q, k, v = (torch.cat(tensors, 2) for tensors in zip(*parts))
    return q, k, v


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=15, help="video frames of 256 tokens")
    parser.add_argument("--text", type=int, default=256, help="text tokens")
    parser.add_argument("--side", choices=["leading", "trailing"], default="leading")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-bonus", type=float, nargs="+", default=[0.0, 4.0, 8.0])
    parser.add_argument("--hot-bonus", type=float, nargs="+", default=[0.0, 6.0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--methods", nargs="+", default=["adaptive", "threshold"], choices=["adaptive", "threshold"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    text_tokens = args.text if args.side == "leading" else -args.text
    print(f"{args.frames} frames x 256 + {args.text} text tokens ({args.side}), {args.heads} heads, D={args.head_dim}")
    print("| text bonus | hot bonus | text mass | method | tau | density | error | video rows | "
          "text dense: density | error | video rows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for text_bonus, hot_bonus in itertools.product(args.text_bonus, args.hot_bonus):
        q, k, v = joint_inputs(
            args.frames, args.text, heads=args.heads, head_dim=args.head_dim, text_bonus=text_bonus,
            hot_bonus=hot_bonus, side=args.side, seed=args.seed,
        )
        text = slice(0, args.text) if args.side == "leading" else slice(q.shape[2] - args.text, None)
        video = torch.ones(q.shape[2], dtype=torch.bool)
        video[text] = False
        dense = F.scaled_dot_product_attention(q, k, v)
        # Share of the video queries' attention on text keys.
        probs = torch.softmax(q[:, :, video][:, :, ::16] @ k.transpose(-1, -2) / math.sqrt(args.head_dim), -1)
        text_mass = probs[..., text].sum(-1).mean().item()
        for method, tau in itertools.product(args.methods, args.thresholds):
            row = []
            for by_call in ({}, {CALL: text_tokens}):
                config = xflex.Config.from_options(
                    dict(method=method, threshold=tau, min_seq_len=0, text_tokens_by_call=by_call)
                )
                plan = xflex.plan(q, k, config=config, call_name=CALL)
                out = plan.attend(q, k, v)
                row += [f"{plan.density():.3f}", f"{_relative_error(out, dense):.4f}",
                        f"{_relative_error(out[:, :, video], dense[:, :, video]):.4f}"]
            print(f"| {text_bonus:g} | {hot_bonus:g} | {text_mass:.2f} | {method} | {tau} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
