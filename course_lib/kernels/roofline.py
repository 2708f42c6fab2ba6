"""What a kernel should cost on a named GPU: bytes and FLOPs, the roofline, the time they imply.

A kernel cannot run faster than the slower of two limits: moving its bytes through memory at
the GPU's bandwidth, and doing its FLOPs at the GPU's peak rate. Which one binds is decided by
the arithmetic intensity (FLOPs per byte) against the GPU's ridge point (peak FLOP/s divided by
bandwidth). Decoding one token is a matrix-vector product: about 2 FLOPs per weight read, far
below any GPU's ridge point, so its floor is the time to read the weights (and the KV cache).

These are *predictions* from datasheet peaks, not measurements: real kernels reach perhaps
70–90% of peak bandwidth. The notebooks print them on a CPU, clearly labelled, and put measured
times next to them where a GPU is present (``benchmarks/quant_kernels.py``,
``benchmarks/paged_attention.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet peaks of one GPU (dense, no sparsity)."""

    name: str
    bandwidth_gb_s: float  # memory bandwidth, 1e9 bytes per second
    fp16_tflops: float  # dense FP16/BF16 tensor-core peak, 1e12 FLOP/s
    sms: int  # streaming multiprocessors (what split-K and split-KV try to fill)
    arch: str  # compute capability, e.g. "sm_90"


#: NVIDIA datasheets: T4 (GDDR6), A100 SXM 40/80 GB (HBM2/HBM2e), H100 SXM5 80 GB (HBM3).
#: The names are those of :data:`course_lib.cost.GPU_PRICES`.
GPUS: dict[str, GPUSpec] = {
    "T4": GPUSpec("T4", 320.0, 65.0, 40, "sm_75"),
    "A100-40GB": GPUSpec("A100-40GB", 1555.0, 312.0, 108, "sm_80"),
    "A100-80GB": GPUSpec("A100-80GB", 2039.0, 312.0, 108, "sm_80"),
    "H100-80GB": GPUSpec("H100-80GB", 3350.0, 989.0, 132, "sm_90"),
}


def gpu_spec(name: str) -> GPUSpec:
    """The :class:`GPUSpec` called ``name``; a clear error listing the known ones otherwise."""
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class Roofline:
    """The roofline prediction for one kernel call on one GPU."""

    gpu: str
    bytes_moved: float
    flops: float
    memory_s: float  # bytes / bandwidth
    compute_s: float  # FLOPs / peak
    intensity: float  # FLOPs per byte
    ridge: float  # the GPU's FLOPs per byte where the two limits meet

    @property
    def floor_s(self) -> float:
        """The predicted lower bound on the kernel's time: the slower of the two limits."""
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def roofline(bytes_moved: float, flops: float, gpu: str | GPUSpec) -> Roofline:
    """Predict the floor of a kernel that moves ``bytes_moved`` and does ``flops`` on ``gpu``."""
    spec = gpu if isinstance(gpu, GPUSpec) else gpu_spec(gpu)
    if bytes_moved <= 0 or flops < 0:
        raise ValueError(f"bytes_moved must be > 0 and flops >= 0, got {bytes_moved}, {flops}")
    bandwidth, peak = spec.bandwidth_gb_s * 1e9, spec.fp16_tflops * 1e12
    return Roofline(spec.name, float(bytes_moved), float(flops), bytes_moved / bandwidth,
                    flops / peak, flops / bytes_moved, peak / bandwidth)


def matmul_traffic(M: int, N: int, K: int, *, weight_bits: int = 16, group_size: int | None = None,
                   act_bytes: int = 2, scale_bytes: int = 2, zero_bytes: int = 1) -> tuple[int, int]:
    """(bytes, FLOPs) of ``y[M, N] = x[M, K] @ W[N, K].T`` when each byte is moved once.

    ``weight_bits`` per weight (16 for fp16, 8 for W8A16, 4 for W4A16). A quantized weight also
    reads one scale per group of ``group_size`` along K (``None``: one per output row, as W8A16),
    plus a zero point when ``zero_bytes`` > 0 (asymmetric int4 stores one uint8 per group).
    Activations ``x`` are read and ``y`` written in ``act_bytes`` each.
    """
    weight = N * K * weight_bits / 8
    if weight_bits < 16:
        groups = N * (1 if group_size is None else math.ceil(K / group_size))
        weight += groups * (scale_bytes + zero_bytes)
    return int(weight + (M * K + M * N) * act_bytes), 2 * M * N * K


def paged_decode_traffic(batch: int, heads: int, kv_heads: int, head_dim: int, context_len: int,
                         *, dtype_bytes: int = 2, block_size: int = 16) -> tuple[int, int]:
    """(bytes, FLOPs) of one decode step of paged attention: every sequence's K and V read once.

    Keys and values: ``batch * context_len * kv_heads * head_dim`` each, read once per KV head
    (one program serves the whole group of query heads that share it). Plus the queries and
    outputs, and the int32 block tables. FLOPs: ``q·k`` and ``p·v``, 2 each per query head,
    key and dimension.
    """
    kv = 2 * batch * context_len * kv_heads * head_dim * dtype_bytes
    q_out = 2 * batch * heads * head_dim * dtype_bytes
    tables = batch * (math.ceil(context_len / block_size) + 1) * 4
    return kv + q_out + tables, 4 * batch * heads * context_len * head_dim
