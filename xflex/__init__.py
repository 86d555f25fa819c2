"""xflex: XAttention block-sparse attention for any PyTorch model, through
FlexAttention, under ``torch.compile(model, backend="xattn")``."""

from .calibration import Calibration, calibration
from .config import Config
from .context import sparsity
from .op import sparse_sdpa
from .stats import CallRecord, SparsityStats
from .backend import last_compile_report, xattn
from .warmup import dense_warmup

__all__ = ["CallRecord", "Calibration", "Config", "SparsityStats", "calibration", "dense_warmup", "last_compile_report", "sparse_sdpa", "sparsity", "xattn"]
__version__ = "0.1.0"
