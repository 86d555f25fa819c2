"""Sweep the Triton scorer's tile configs, loop flattening and reduction step
on one GPU (64K and 128K tokens, S=8 and 16): each config forced in turn,
errors against the first config's scores printed beside the time.

    python bench/tune_scoring.py
"""

import itertools
import os
import sys

import torch
import triton
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic import llm_like_inputs
import xflex.score_mods.antidiagonal_triton as at
from triton.testing import do_bench
kern = at._antidiagonal_scores_kernel
orig_block_k = at._block_k
cands = [(128,128,8,3,False),(128,128,8,4,False),(128,256,8,3,False),(128,256,8,3,True),(128,128,8,4,True),(256,128,8,3,False),(128,128,4,3,False),(64,128,4,4,False),(128,64,4,4,False),(128,128,8,2,False)]
for L in (65536, 131072):
    q, k, v = llm_like_inputs(L)
    ref = None
    for S in (8, 16):
        res = []
        for (bm, bn, w, st, flat), bk in itertools.product(cands, (64, 128)):
            kern.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "FLATTEN": flat}, num_warps=w, num_stages=st)]
            kern.cache = {}
            at._block_k = lambda D, bk=bk: bk
            try:
                out = at.antidiagonal_block_scores_triton(q, k, stride=S, block_size=128, causal_offset=0)
                t = do_bench(lambda: at.antidiagonal_block_scores_triton(q, k, stride=S, block_size=128, causal_offset=0), warmup=10, rep=50, return_mode="median")
                if ref is None or ref[0] != S: ref = (S, out)
                err = (out - ref[1]).abs().max().item()
                res.append((t, f"BM{bm} BN{bn} w{w} s{st} BK{bk}{' flat' if flat else ''}", err))
            except Exception as e:
                res.append((float("inf"), f"BM{bm} BN{bn} w{w} s{st} BK{bk}{' flat' if flat else ''} FAIL {str(e)[:80]}", 0))
            torch.cuda.empty_cache()
        res.sort()
        print(f"L={L} S={S}: " + "; ".join(f"{n}={t:.2f}ms(err {e:.1e})" for t, n, e in res[:6]), flush=True)
        print("   worst: " + "; ".join(f"{n}={t:.2f}" for t, n, e in res[-3:]), flush=True)
