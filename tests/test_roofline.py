"""The roofline predictions the kernel lessons print: formulas checked against hand counts."""

import pytest

from course_lib.cost import GPU_PRICES
from course_lib.kernels.roofline import GPUS, matmul_traffic, paged_decode_traffic, roofline


def test_gpu_names_are_the_cost_tables():
    assert set(GPUS) <= set(GPU_PRICES)


def test_fp16_gemv_bytes_and_flops_by_hand():
    nbytes, flops = matmul_traffic(1, 4096, 4096)
    assert nbytes == 4096 * 4096 * 2 + (4096 + 4096) * 2
    assert flops == 2 * 4096 * 4096


def test_w4a16_reads_a_quarter_of_the_weight_plus_one_scale_and_zero_per_group():
    nbytes, _ = matmul_traffic(1, 4096, 4096, weight_bits=4, group_size=128)
    groups = 4096 * 4096 // 128
    assert nbytes == 4096 * 4096 // 2 + groups * 3 + (4096 + 4096) * 2


def test_decode_gemv_is_memory_bound_and_w4a16_floor_is_over_3x_fp16():
    for gpu in GPUS:
        fp16 = roofline(*matmul_traffic(1, 4096, 4096), gpu)
        w4 = roofline(*matmul_traffic(1, 4096, 4096, weight_bits=4, group_size=128), gpu)
        assert fp16.bound == w4.bound == "memory"
        assert 3.0 < fp16.floor_s / w4.floor_s < 4.0


def test_large_prefill_is_compute_bound():
    assert roofline(*matmul_traffic(4096, 4096, 4096), "H100-80GB").bound == "compute"


def test_memory_floor_is_bytes_over_bandwidth():
    r = roofline(2039e9, 1.0, "A100-80GB")
    assert r.floor_s == pytest.approx(1.0)


def test_paged_decode_reads_kv_heads_not_query_heads():
    gqa, _ = paged_decode_traffic(4, 9, 3, 64, 1000)
    mha, _ = paged_decode_traffic(4, 9, 9, 64, 1000)
    kv_gqa = 2 * 4 * 1000 * 3 * 64 * 2
    assert mha - gqa == 2 * kv_gqa  # 9 instead of 3 KV heads: three times the K/V bytes
    assert gqa > kv_gqa


def test_unknown_gpu_and_bad_counts_are_clear_errors():
    with pytest.raises(ValueError, match="unknown GPU 'V100'.*known"):
        roofline(1, 1, "V100")
    with pytest.raises(ValueError, match="bytes_moved must be > 0"):
        roofline(0, 1, "T4")
