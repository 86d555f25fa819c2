"""Selection quality on real attention: for every layer of SmolLM2-135M on
~7K tokens of real text, how much of the true attention mass the selected
blocks hold (recall) and how many blocks they take (density), against the
oracle (the fewest blocks whose true mass reaches tau).

Recall and oracle are exact on sampled query blocks (true softmax rows over
all keys). Variants change the selection rules or the scorer's softmax
temperature, so their numbers can be compared side by side.

    python -m bench.selection_quality [--tokens 7000] [--samples 12] [--out table.md]
    python -m bench.selection_quality --per-layer-target 0.9   # calibrated per-layer tau vs global tau
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
from xflex.attention import oracle_block_counts, sampled_block_mass


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


_TAU_GRID = (0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


def capture(model, tokenizer, path, tokens):
    """``(q, k, scale)`` of every layer's attention on the first ``tokens`` tokens of ``path``."""
    ids = tokenizer(open(path).read(), return_tensors="pt").input_ids[:, :tokens]
    demo.log(f"capturing q/k of every layer on {ids.shape[1]} tokens of {path}")
    with torch.no_grad(), captured_attention_inputs() as calls:
        model(ids)
    return [(q, k, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale) for q, k, _mask, _causal, scale in calls], ids.shape[1]


def measure(calls, length, block_size, samples, settings_for_layer):
    """Per layer: oracle density at tau 0.9 and ``{name: (recall, density)}`` for
    each variant ``settings_for_layer(layer) -> {name: (config kwargs, temperature)}``."""
    n_q = math.ceil(length / block_size)
    q_blocks = sorted(set(torch.linspace(2, n_q - 1, samples).round().long().tolist()))
    visible = torch.tensor([i + 1 for i in q_blocks], dtype=torch.float32)
    per_layer = []
    for layer, (q, k, scale) in enumerate(calls):
        mass = sampled_block_mass(q, k, None, True, scale, block_size, q_blocks)[0]
        oracle = (oracle_block_counts(mass, 0.9).float() / visible).mean().item()
        results = {}
        for name, (settings, temperature) in settings_for_layer(layer).items():
            config = xflex.Config(block_size=block_size, **settings)
            # Only the scorer sees the scale: scaling it is a scorer temperature.
            chosen = xflex.plan(q, k, is_causal=True, scale=scale * temperature, config=config).selected[0][:, q_blocks]
            results[name] = ((mass * chosen).sum(-1).mean().item(), (chosen.sum(-1).float() / visible).mean().item())
        per_layer.append((oracle, results))
        demo.log(f"layer {layer}: oracle {oracle:.3f} " + " ".join(f"{n}={r:.2f}/{d:.2f}" for n, (r, d) in results.items()))
    return per_layer


def calibrate(calls, length, block_size, samples, stride, target):
    """Per layer, the smallest tau in the grid whose recall reaches ``target``
    (the largest when none does)."""
    grid = {f"tau{t}": (dict(threshold=t, stride=stride), 1.0) for t in _TAU_GRID}
    taus = []
    for _oracle, results in measure(calls, length, block_size, samples, lambda layer: grid):
        reaching = [t for t in _TAU_GRID if results[f"tau{t}"][0] >= target]
        taus.append(reaching[0] if reaching else _TAU_GRID[-1])
    return taus


def table(per_layer) -> str:
    lines = ["| variant | mean recall | min recall (layer) | recall layers 3-10 | density (sampled rows) | oracle density tau 0.9 |", "|---|---|---|---|---|---|"]
    mean_oracle = sum(o for o, _ in per_layer) / len(per_layer)
    for name in per_layer[0][1]:
        recalls = [results[name][0] for _, results in per_layer]
        densities = [results[name][1] for _, results in per_layer]
        worst = min(range(len(recalls)), key=recalls.__getitem__)
        mid = recalls[3:11]
        lines.append(
            f"| {name} | {sum(recalls) / len(recalls):.3f} | {recalls[worst]:.3f} ({worst}) | {min(mid):.2f}-{max(mid):.2f} "
            f"| {sum(densities) / len(densities):.3f} | {mean_oracle:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=7000)
    parser.add_argument("--samples", type=int, default=12, help="query blocks sampled per layer")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument(
        "--per-layer-target",
        type=float,
        help="also calibrate one tau per layer (the smallest of %s whose recall reaches this) on --calibration-text "
        "and compare it with global taus" % (_TAU_GRID,),
    )
    parser.add_argument("--calibration-text", default="/usr/share/common-licenses/LGPL-2.1")
    parser.add_argument("--stride", type=int, default=8, help="stride of the per-layer comparison")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    demo.log("loading SmolLM2-135M-Instruct")
    model, tokenizer = demo.load_smollm2(torch.device("cpu"), torch.float32)
    variants = dict(VARIANTS)
    if args.per_layer_target is not None:
        calibration, cal_length = capture(model, tokenizer, args.calibration_text, args.tokens)
        taus = calibrate(calibration, cal_length, args.block_size, args.samples, args.stride, args.per_layer_target)
        print(f"per-layer taus for recall >= {args.per_layer_target} on {args.calibration_text}: {taus}")
        by_call = {f"model.layers.{i}.self_attn": t for i, t in enumerate(taus) if t != _TAU_GRID[0]}
        print(f"as xflex options (Hugging Face call names): threshold={_TAU_GRID[0]}, threshold_by_call={by_call}")
        del calibration
        globals_ = {f"tau{t} S{args.stride}": (dict(threshold=t, stride=args.stride), 1.0) for t in (0.9, 0.95, 0.97)}
        name = f"per-layer tau (recall >= {args.per_layer_target} on calibration text) S{args.stride}"
        variants = {**globals_, name: None}
    calls, length = capture(model, tokenizer, demo.DEFAULT_TEXT, args.tokens)

    def settings_for_layer(layer):
        return {n: v if v is not None else (dict(threshold=taus[layer], stride=args.stride), 1.0) for n, v in variants.items()}

    per_layer = measure(calls, length, args.block_size, args.samples, settings_for_layer)
    result = table(per_layer)
    print(f"SmolLM2-135M, {length} tokens of GPL-3, {len(calls)} layers, {args.samples} sampled query blocks per layer")
    print(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(result + "\n")


if __name__ == "__main__":
    sys.exit(main())
