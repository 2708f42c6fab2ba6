"""Paged attention: the Triton kernels against their torch twins, and the twins against an
independent computation on contiguous K/V (plain SDPA). On the CPU the kernels run in Triton's
interpreter, so shapes stay small."""

import pytest
import torch
import torch.nn.functional as F

import course_lib.kernels  # noqa: F401  (decides the Triton mode before triton is imported)
from course_lib.kernels.paged_attention import (
    gather_kv,
    paged_decode_attention,
    paged_decode_attention_padded,
    paged_decode_attention_reference,
    paged_prefill_attention,
    pick_num_splits,
    splits_for,
    store_kv,
    store_kv_reference,
)
from course_lib.runtime import get_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONTEXTS = [1, 5, 16, 17, 33, 100]  # ragged: one token, partly filled and exactly full blocks
# float32 differs from the twin only in summation order; 16-bit outputs by their final rounding
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got.float()).all()
    scale = want.float().abs().max().item() + 1e-6
    err = (got.float() - want.float()).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


def make_paged(contexts, H, D, block_size, dtype=torch.float32, seed=0, pad=-1, device="cpu",
               extra_cols=1, Hkv=None):
    """Contiguous random K/V per sequence, scattered into a shuffled set of physical blocks.

    Independent of course_lib: plain indexing, no store_kv. Unused slots hold random garbage
    (never zeros), so a kernel that reads past a context or through a padding entry is caught.
    ``Hkv`` KV heads (default H) for H query heads: every KV head holds different values, so a
    query head that reads the wrong one is caught.
    """
    Hkv = Hkv or H
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(L, Hkv, D, generator=g).to(dtype) for L in contexts]
    vs = [torch.randn(L, Hkv, D, generator=g).to(dtype) for L in contexts]
    needed = [-(-L // block_size) for L in contexts]
    num_blocks = sum(needed) + 3  # spare blocks that belong to nobody
    perm = torch.randperm(num_blocks, generator=g)
    k_cache = (100 * torch.randn(num_blocks, block_size, Hkv, D, generator=g)).to(dtype)
    v_cache = (100 * torch.randn(num_blocks, block_size, Hkv, D, generator=g)).to(dtype)
    tables = torch.full((len(contexts), max(needed) + extra_cols), pad, dtype=torch.int32)
    first = 0
    for i, (L, n) in enumerate(zip(contexts, needed, strict=True)):
        blocks = perm[first:first + n]
        first += n
        tables[i, :n] = blocks.to(torch.int32)
        t = torch.arange(L)
        k_cache[blocks[t // block_size], t % block_size] = ks[i]
        v_cache[blocks[t // block_size], t % block_size] = vs[i]
    q = torch.randn(len(contexts), H, D, generator=g).to(dtype)
    lens = torch.tensor(contexts, dtype=torch.int32)
    return dict(q=q.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
                block_tables=tables.to(device), context_lens=lens.to(device),
                ks=[k.to(device) for k in ks], vs=[v.to(device) for v in vs])


def kv_head_of(H, Hkv):
    """The KV head each query head reads, spelt out: h // (H / Hkv)."""
    return torch.tensor([h // (H // Hkv) for h in range(H)])


def contiguous_decode(p, scale=None):
    """Independent decode: SDPA of each sequence's one query against its contiguous K/V, each
    query head against its own KV head picked explicitly."""
    outs = []
    H, Hkv = p["q"].shape[1], p["k_cache"].shape[2]
    for i, (k, v) in enumerate(zip(p["ks"], p["vs"], strict=True)):
        q = p["q"][i][:, None, :].double()  # [H, 1, D]
        k, v = (t.transpose(0, 1)[kv_head_of(H, Hkv)].double() for t in (k, v))  # [H, L, D]
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        outs.append(o[:, 0])
    return torch.stack(outs).to(p["q"].dtype)


def args(p):
    return p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["context_lens"]


# ------------------------------------------------------------------ decode


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_twin_matches_contiguous_sdpa(block_size, dtype):
    p = make_paged(CONTEXTS, H=3, D=16, block_size=block_size, dtype=dtype, seed=block_size)
    assert_close(paged_decode_attention_reference(*args(p)), contiguous_decode(p), dtype)
    assert_close(paged_decode_attention_reference(*args(p), scale=0.3), contiguous_decode(p, 0.3), dtype)


@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_kernel_matches_twin_over_splits(triton_kernels, block_size):
    p = make_paged(CONTEXTS, H=1, D=32, block_size=block_size, seed=block_size)  # H > 1: below
    want = paged_decode_attention_reference(*args(p))
    for splits in (1, 2, 4, 7):  # 7 splits of a 1- or 5-token context: most get no token
        assert_close(paged_decode_attention(*args(p), num_splits=splits), want, torch.float32)
    assert_close(want, contiguous_decode(p), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_kernel_matches_twin_dtypes_and_head_dims(triton_kernels, head_dim, dtype):
    p = make_paged([1, 17, 40], H=2, D=head_dim, block_size=16, dtype=dtype, seed=head_dim)
    want = paged_decode_attention_reference(*args(p))
    for splits in (None, 3):
        assert_close(paged_decode_attention(*args(p), num_splits=splits, backend="triton"), want, dtype)
    assert_close(want, contiguous_decode(p), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("pad", [-1, 0, 2**30])
def test_padded_torch_decode_matches_contiguous_sdpa(block_size, dtype, pad):
    """The CPU's one-call decode: garbage in padding blocks and past each context never leaks."""
    p = make_paged(CONTEXTS, H=3, D=16, block_size=block_size, dtype=dtype, seed=block_size,
                   pad=pad, extra_cols=2)
    assert_close(paged_decode_attention_padded(*args(p)), contiguous_decode(p), dtype)
    assert_close(paged_decode_attention_padded(*args(p), scale=0.3), contiguous_decode(p, 0.3), dtype)


def test_padding_entries_are_never_read(triton_kernels):
    outs = []
    for pad in (-1, 0, 2**30):  # -1, a valid block id, and an id far past the cache
        p = make_paged([5, 16, 20], H=2, D=16, block_size=8, pad=pad, extra_cols=3)
        if pad == 2**30:  # the twin clamps ids, but the checks only look at used entries
            want = paged_decode_attention_reference(*args(p))
        outs.append(paged_decode_attention(*args(p), num_splits=2))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert_close(outs[2], want, torch.float32)


def test_strided_q_int64_metadata_and_scale(triton_kernels):
    p = make_paged([3, 9, 26], H=2, D=16, block_size=4, seed=3)
    qkv = torch.randn(3, 3, 2, 16)  # a fused projection: q is a strided view of it
    qkv[:, 0] = p["q"]
    q = qkv[:, 0]
    assert not q.is_contiguous()
    want = paged_decode_attention_reference(*args(p), scale=0.2)
    got = paged_decode_attention(q, p["k_cache"], p["v_cache"], p["block_tables"].long(),
                                 p["context_lens"].long(), scale=0.2, num_splits=2)
    assert_close(got, want, torch.float32)
    assert_close(paged_decode_attention(*args(p), scale=0.2, backend="torch"), want, torch.float32)
    assert_close(paged_decode_attention(*args(p), scale=0.2, validate=False), want, torch.float32)


def test_num_splits_rule():
    assert pick_num_splits(4, 12, 8192, torch.device("cpu")) == 1  # interpreter: nothing to fill
    sms = 132  # an H100
    assert splits_for(128, 12, 8192, sms) == 1  # 1536 programs already fill the GPU
    assert splits_for(32, 12, 2048, sms) == 2
    assert splits_for(1, 12, 8192, sms) == 32  # capped at MAX_SPLITS
    assert splits_for(1, 12, 512, sms) == 2  # every split keeps >= 256 tokens
    assert splits_for(1, 1, 16, sms) == 1


# ------------------------------------------------------------------ store_kv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_matches_twin_and_skips_negative_slots(triton_kernels, dtype):
    g = torch.Generator().manual_seed(5)
    num_blocks, block_size, H, D = 6, 4, 3, 16
    cache = [torch.randn(num_blocks, block_size, H, D, generator=g).to(dtype) for _ in range(2)]
    qkv = torch.randn(7, 3, H, D, generator=g).to(dtype)  # key, value: strided views
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([5, -1, 0, 23, 9, -1, 12])
    mine = [c.clone() for c in cache]
    twin = [c.clone() for c in cache]
    store_kv(key, value, *mine, slots)
    store_kv_reference(key, value, *twin, slots)
    assert torch.equal(mine[0], twin[0]) and torch.equal(mine[1], twin[1])
    flat_k, flat_v = mine[0].reshape(-1, H, D), mine[1].reshape(-1, H, D)
    written = slots >= 0
    assert torch.equal(flat_k[slots[written]], key[written])
    assert torch.equal(flat_v[slots[written]], value[written])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[written]] = False  # the skipped tokens were written nowhere
    assert torch.equal(flat_k[untouched], cache[0].reshape(-1, H, D)[untouched])


def stored_by_slots(p):
    """Fresh zero caches holding each sequence of ``p`` written through its slots by store_kv,
    as an engine writes them: (k_cache, v_cache)."""
    bs = p["k_cache"].shape[1]
    k_cache, v_cache = torch.zeros_like(p["k_cache"]), torch.zeros_like(p["v_cache"])
    for i, (k, v) in enumerate(zip(p["ks"], p["vs"], strict=True)):
        t = torch.arange(k.shape[0])
        slots = p["block_tables"][i].long()[t // bs] * bs + t % bs
        store_kv(k, v, k_cache, v_cache, slots)
    return k_cache, v_cache


def test_store_then_decode_matches_contiguous_attention(triton_kernels):
    """What an engine does: store each sequence's tokens through its slots, then decode."""
    p = make_paged([7, 12], H=2, D=16, block_size=4, seed=9)
    k_cache, v_cache = stored_by_slots(p)
    got = paged_decode_attention(p["q"], k_cache, v_cache, p["block_tables"], p["context_lens"],
                                 num_splits=2)
    assert_close(got, contiguous_decode(p), torch.float32)


# ------------------------------------------------------------------ grouped-query attention

GQA_RATIOS = [1, 3, 4]  # query heads per KV head (SmolLM2: 3)


@pytest.mark.parametrize("ratio", GQA_RATIOS)
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_gqa_kernel_and_twins_match_contiguous_attention(triton_kernels, block_size, ratio):
    """Two KV heads (different values) for 2 x ratio query heads, head_dim 24 (not a power of
    two), ragged contexts with partly filled blocks: the kernel (one and several splits), its
    twin and the CPU's padded path all equal SDPA with each query head's KV head picked explicitly."""
    p = make_paged(CONTEXTS, H=2 * ratio, D=24, block_size=block_size, seed=20 + block_size + ratio,
                   Hkv=2, extra_cols=2)
    want = contiguous_decode(p)
    assert_close(paged_decode_attention_reference(*args(p)), want, torch.float32)
    assert_close(paged_decode_attention_padded(*args(p)), want, torch.float32)
    for splits in (1, 3):
        assert_close(paged_decode_attention(*args(p), num_splits=splits), want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_kernel_16bit_and_store_kv(triton_kernels, dtype):
    """SmolLM2's layout (9 query heads, 3 KV heads, head_dim 64) in every dtype, written by
    store_kv (which takes the KV heads only) and read back by the kernel."""
    p = make_paged([5, 19], H=9, D=64, block_size=8, dtype=dtype, seed=31, Hkv=3)
    k_cache, v_cache = stored_by_slots(p)
    got = paged_decode_attention(p["q"], k_cache, v_cache, p["block_tables"], p["context_lens"],
                                 num_splits=2, backend="triton")
    assert_close(got, contiguous_decode(p), dtype)


@pytest.mark.parametrize("ratio", GQA_RATIOS)
def test_gqa_prefill_matches_causal_sdpa(ratio):
    contexts, query_lens, H, Hkv, D, bs = [1, 9, 30], [1, 9, 7], 2 * ratio, 2, 24, 8
    p = make_paged(contexts, H, D, bs, seed=40 + ratio, Hkv=Hkv)
    g = torch.Generator().manual_seed(41)
    q_full = [torch.randn(L, H, D, generator=g) for L in contexts]
    q = torch.cat([qf[L - n:] for qf, L, n in zip(q_full, contexts, query_lens, strict=True)])
    want = torch.cat([contiguous_causal(k, v, qf)[L - n:] for k, v, qf, L, n in
                      zip(p["ks"], p["vs"], q_full, contexts, query_lens, strict=True)]).float()
    got = paged_prefill_attention(q, p["k_cache"], p["v_cache"], p["block_tables"], contexts, query_lens)
    assert_close(got, want, torch.float32)


def test_gqa_heads_that_do_not_divide_are_refused():
    p = make_paged([3, 9], H=4, D=16, block_size=4, Hkv=2)
    q5 = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"Hkv dividing q's H = 5 \(query head h reads KV head"):
        paged_decode_attention(q5, *args(p)[1:])
    with pytest.raises(ValueError, match="Hkv dividing q's H = 5"):
        paged_prefill_attention(q5, p["k_cache"], p["v_cache"], p["block_tables"], [3, 9], [1, 1])
    empty = p["k_cache"][:, :, :0]  # no KV head at all
    with pytest.raises(ValueError, match="Hkv dividing q's H = 4"):
        paged_decode_attention(p["q"], empty, empty, p["block_tables"], p["context_lens"])
    with pytest.raises(ValueError, match=r"key must be \[N, Hkv, D\] = \[N, 2, 16\]"):
        store_kv(q5[:, :4], q5[:, :4], p["k_cache"], p["v_cache"], torch.tensor([0, 1]))


# ------------------------------------------------------------------ prefill


def contiguous_causal(k, v, q_full, scale=None):
    """Independent prefill: causal SDPA over a whole contiguous sequence, [L, H, D] (k, v:
    [L, Hkv, D], query head h reading KV head h // (H / Hkv))."""
    heads = kv_head_of(q_full.shape[1], k.shape[1])
    o = F.scaled_dot_product_attention(q_full.transpose(0, 1).double(), k.transpose(0, 1)[heads].double(),
                                       v.transpose(0, 1)[heads].double(), is_causal=True, scale=scale)
    return o.transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunked", [False, True], ids=["full", "chunked"])
def test_prefill_matches_causal_sdpa(dtype, chunked):
    contexts, H, D, block_size = [1, 9, 16, 30], 2, 16, 8
    p = make_paged(contexts, H, D, block_size, dtype=dtype, seed=11)
    query_lens = [1, 4, 16, 7] if chunked else contexts  # chunked: the last query_lens positions
    g = torch.Generator().manual_seed(12)
    q_full = [torch.randn(L, H, D, generator=g).to(dtype) for L in contexts]
    q = torch.cat([qf[L - n:] for qf, L, n in zip(q_full, contexts, query_lens, strict=True)])
    want = torch.cat([contiguous_causal(k, v, qf)[L - n:] for k, v, qf, L, n in
                      zip(p["ks"], p["vs"], q_full, contexts, query_lens, strict=True)]).to(dtype)
    got = paged_prefill_attention(q, p["k_cache"], p["v_cache"], p["block_tables"], contexts, query_lens)
    assert_close(got, want, dtype)
    got_t = paged_prefill_attention(q, p["k_cache"], p["v_cache"], p["block_tables"], p["context_lens"],
                                    torch.tensor(query_lens), scale=0.5)
    want_t = torch.cat([contiguous_causal(k, v, qf, 0.5)[L - n:] for k, v, qf, L, n in
                        zip(p["ks"], p["vs"], q_full, contexts, query_lens, strict=True)]).to(dtype)
    assert_close(got_t, want_t, dtype)


def test_prefill_last_row_is_decode():
    p = make_paged([6, 13], H=2, D=16, block_size=4, seed=13)
    out = paged_prefill_attention(p["q"], p["k_cache"], p["v_cache"], p["block_tables"], [6, 13], [1, 1])
    assert_close(out, paged_decode_attention_reference(*args(p)), torch.float32)


def test_gather_kv_returns_the_sequence_in_order():
    p = make_paged([1, 17, 33], H=2, D=16, block_size=8, seed=14)
    for i, L in enumerate([1, 17, 33]):
        k, v = gather_kv(p["k_cache"], p["v_cache"], p["block_tables"][i], L)
        assert torch.equal(k, p["ks"][i]) and torch.equal(v, p["vs"][i])
    with pytest.raises(ValueError, match="context_len must be in"):
        gather_kv(p["k_cache"], p["v_cache"], p["block_tables"][0], 0)
    with pytest.raises(ValueError, match="block ids"):
        gather_kv(p["k_cache"], p["v_cache"], p["block_tables"][0], 9)  # reads the -1 padding


# ------------------------------------------------------------------ bad inputs


def test_decode_bad_inputs_raise_clear_errors():
    p = make_paged([3, 9], H=2, D=16, block_size=4)
    q, kc, vc, bt, cl = args(p)
    cases = [
        ((q[0], kc, vc, bt, cl), ValueError, "q must be 3-D"),
        ((q, kc[..., :8], vc[..., :8], bt, cl), ValueError, "k_cache must be"),
        ((q, kc, vc[:-1], bt, cl), ValueError, "v_cache must have k_cache's shape"),
        ((q.half(), kc, vc, bt, cl), TypeError, "q dtype torch.float16 must equal the cache dtype"),
        ((q, kc, vc, bt.float(), cl), TypeError, "block_tables must be an int32 or int64"),
        ((q, kc, vc, bt[0], cl), ValueError, "block_tables must be 2-D"),
        ((q, kc, vc, bt, cl.float()), TypeError, "context_lens must be an int32 or int64"),
        ((q, kc, vc, bt[:1], cl), ValueError, "need B = 2 rows"),
        ((q, kc, vc, bt, torch.tensor([0, 9], dtype=torch.int32)), ValueError, "context_lens must be in 1..16"),
        ((q, kc, vc, bt, torch.tensor([3, 17], dtype=torch.int32)), ValueError, "context_lens must be in 1..16"),
        ((q, kc, vc, torch.tensor([[0, -1, -1], [1, 2, 99]], dtype=torch.int32), cl), ValueError,
         r"block_tables\[1, 2\] = 99 is used"),
    ]
    for a, exc, match in cases:
        with pytest.raises(exc, match=match):
            paged_decode_attention(*a)
    with pytest.raises(ValueError, match="num_splits must be"):
        paged_decode_attention(*args(p), num_splits=0)
    with pytest.raises(ValueError, match="scale must be"):
        paged_decode_attention(*args(p), scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        paged_decode_attention(*args(p), backend="cuda")


def test_store_and_prefill_bad_inputs_raise_clear_errors():
    kc, vc = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
    key = torch.randn(3, 2, 16)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="key must be"):
        store_kv(key[:, :1], key, kc, vc, slots)
    with pytest.raises(TypeError, match="value dtype"):
        store_kv(key, key.half(), kc, vc, slots)
    with pytest.raises(TypeError, match="slot_mapping must be an int"):
        store_kv(key, key, kc, vc, slots.float())
    with pytest.raises(ValueError, match="slot_mapping must have N = 3"):
        store_kv(key, key, kc, vc, slots[:2])
    with pytest.raises(ValueError, match="must be < num_blocks"):
        store_kv(key, key, kc, vc, torch.tensor([0, 1, 8]))
    bt = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"query_lens\[0\] must be in 1..context_lens\[0\] = 3"):
        paged_prefill_attention(key, kc, vc, bt, [3], [4])
    with pytest.raises(ValueError, match=r"sum\(query_lens\) = 2"):
        paged_prefill_attention(key, kc, vc, bt, [3], [2])
    with pytest.raises(ValueError, match="need B = 1 entries"):
        paged_prefill_attention(key, kc, vc, bt, [3, 1], [2, 1])
    with pytest.raises(TypeError, match="query_lens must be a list of ints"):
        paged_prefill_attention(key, kc, vc, bt, [3], [2.5])


# ------------------------------------------------------------------ on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_kernel_matches_twin_on_the_device(dtype, block_size):
    device = get_device()
    contexts = CONTEXTS + [513, 2000]
    # (H, Hkv, D): MHA shapes, SmolLM2's 9/3 heads of 64, a group of 4 and of 8 at head_dim 128
    for H, Hkv, D in [(2, 2, 16), (12, 12, 64), (9, 3, 64), (8, 2, 128), (16, 2, 128)]:
        p = make_paged(contexts, H, D, block_size, dtype=dtype, seed=block_size, device=device, Hkv=Hkv)
        want = paged_decode_attention_reference(*args(p))
        assert_close(want, contiguous_decode(p), dtype)
        for splits in (None, 1, 2, 7, 40):
            assert_close(paged_decode_attention(*args(p), num_splits=splits, backend="triton"), want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_matches_twin_on_the_device(dtype):
    device = get_device()
    g = torch.Generator(device).manual_seed(0)
    k_cache = torch.randn(64, 16, 12, 64, generator=g, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    qkv = torch.randn(300, 3, 12, 64, generator=g, device=device).to(dtype)
    slots = torch.randperm(64 * 16, generator=g, device=device)[:300]
    slots[::7] = -1
    mine, twin = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
    store_kv(qkv[:, 1], qkv[:, 2], *mine, slots, backend="triton")
    store_kv_reference(qkv[:, 1], qkv[:, 2], *twin, slots)
    assert torch.equal(mine[0], twin[0]) and torch.equal(mine[1], twin[1])
