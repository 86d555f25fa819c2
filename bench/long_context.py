"""256K tokens on one GPU: peak extra memory of scoring, selection and the
whole xflex op, the BlockMask's own size, and time against cuDNN dense.

    python bench/long_context.py
"""

import os
import sys

import torch
import torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic import llm_like_inputs
import xflex
from xflex import op as xop
from triton.testing import do_bench
from torch.nn.attention import sdpa_kernel, SDPBackend
L = 262144
q, k, v = llm_like_inputs(L)
base = torch.cuda.memory_allocated()
def peak(fn):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); fn(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
for S in (16, 8):
    cfg = xflex.Config(threshold=0.9, stride=S)
    pattern = xop.call_pattern(q, k, None, True, 128)
    xop.plan_blocks(q, k, None, True, None, cfg)  # autotune first: its timing allocates a 256 MB L2-flush buffer
    m_score = peak(lambda: xop._block_scores(q, k, pattern, cfg, None))
    m_plan = peak(lambda: xop.plan_blocks(q, k, None, True, None, cfg))
    _, blocks = xop.plan_blocks(q, k, None, True, None, cfg)
    bm = xop._build_block_mask(blocks, pattern, 128, (L, L), False)
    bm_mib = sum(t.numel() * t.element_size() for t in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)) / 2**20
    del bm, blocks
    with xflex.sparsity() as st:
        m_total = peak(lambda: xflex.sparse_sdpa(q, k, v, is_causal=True, config=cfg))
    t_x = do_bench(lambda: xflex.sparse_sdpa(q, k, v, is_causal=True, config=cfg), warmup=1, rep=1, return_mode="median")
    t_s = do_bench(lambda: xop._block_scores(q, k, pattern, cfg, None), warmup=1, rep=1, return_mode="median")
    print(f"256K S={S}: density {st.density:.3f}; peak extra MiB: scoring {m_score:.0f}, scoring+selection {m_plan:.0f}, whole op {m_total:.0f} (output {L*32*128*2/2**20:.0f}); BlockMask tensors {bm_mib:.0f} MiB; xflex {t_x:.1f} ms, scoring {t_s:.1f} ms", flush=True)
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    t_d = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=1, rep=1, return_mode="median")
print(f"256K cuDNN dense {t_d:.1f} ms", flush=True)
