"""xflex: XAttention block-sparse attention for any PyTorch model, through
FlexAttention, under ``torch.compile(model, backend="xattn")``.

Data flow: ``backend`` (the ``xattn`` backend) runs ``passes`` (find SDPA
calls, rewrite them into the xflex op), then Inductor. At run time each call
goes through ``op`` (settings from ``context``, fallbacks from ``policy``)
and ``planning`` into the stages of ``attention``: scoring -> selection ->
BlockMask -> FlexAttention, reporting to ``stats``. ``distributed`` runs
the op on sequence shards over several ranks (Ulysses)."""

from . import distributed
from .attention import BACKENDS, Backend, KVBlocks, SdpaArgs
from .backend import CompiledCall, last_compile_report, xattn
from .calibration import Calibration, calibration
from .config import Config, Threshold
from .context import UNSET, sparsity
from .op import sparse_sdpa
from .planning import Plan, plan
from .stats import CallRecord, SparsityStats
from .warmup import DenseWarmup, dense_warmup
from . import integrations

# attn_implementation="xattn" for transformers models, when transformers is
# already imported (importing it here would double the cost of this import).
integrations.transformers.register_if_imported()

__all__ = [
    "BACKENDS",
    "Backend",
    "CallRecord",
    "Calibration",
    "CompiledCall",
    "Config",
    "DenseWarmup",
    "KVBlocks",
    "Plan",
    "SdpaArgs",
    "SparsityStats",
    "Threshold",
    "UNSET",
    "calibration",
    "dense_warmup",
    "distributed",
    "integrations",
    "last_compile_report",
    "plan",
    "sparse_sdpa",
    "sparsity",
    "xattn",
]
__version__ = "0.1.0"
