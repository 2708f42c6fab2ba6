"""Checks for the exercises of chapter 6 (PagedAttention).

* The block allocator is run on fixed cases, then on seeded random interleavings of
  allocate / append / fork / free, in lockstep with a small reference written here. After
  every operation the learner's state must be consistent: every block's reference count equals
  the number of block tables holding it, the free list holds exactly the blocks nobody holds
  (each once), tables have ``ceil(tokens / block_size)`` blocks, and a token is never written
  into a block another sequence still reads (a simulated cache checks each sequence's contents).
  In hidden mode (``hidden_seed``) the interleavings, and the pool sizes and block sizes they
  run on, come from the instructor's seed.
* The slot mapping is compared with :func:`course_lib.models.paged.slot_mapping` on random
  block tables.
* Paged attention for one sequence is compared with the torch twin of the decode kernel,
  :func:`course_lib.kernels.paged_attention.paged_decode_attention_reference`, on random
  ragged cases whose block tables are shuffled and padded with ``-1`` (and whose unused cache
  slots hold garbage, so reading past the context shows).

Hidden cases draw the random block tables, shapes, contexts and values from the instructor's
seed; the hand-picked cases stay as they are.
"""

from __future__ import annotations

import random

import torch

from course_lib.grading.core import Context, check, expect_close, expect_tensor, read_attributes
from course_lib.kernels.paged_attention import paged_decode_attention_reference
from course_lib.models.paged import slot_mapping as reference_slot_mapping

POINTS = {"block_allocator": 3, "slot_mapping": 2, "paged_attention": 3}

#: Random operations per interleaving, and interleavings (each with its own seed).
RANDOM_OPS, RANDOM_RUNS = 300, 6
#: (num_blocks, block_size) of the visible random runs; hidden runs draw their own.
RUN_SHAPES = [(12, 2), (16, 4), (24, 4), (10, 8)]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- exercise (a): the block allocator --------------------------------------------------------


class _Model:
    """What the allocator's state must be: tokens and table length per sequence, and which
    sequences share each block. Block ids are the learner's; only their counts and sharing matter."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.tokens: dict[int, int] = {}
        self.contents: dict[int, list[tuple[int, int]]] = {}  # block -> slots: (seq, position)
        self.history: dict[int, list[tuple[int, int]]] = {}  # seq -> what each position holds

    def blocks_needed_to_append(self, alloc, seq: int) -> int:
        n = self.tokens[seq]
        if n % self.block_size == 0:
            return 1  # the last block is full (or there is none): a new block
        tables, ref_counts = read_attributes(alloc, "block_tables", "ref_counts")
        return 1 if ref_counts[tables[seq][-1]] > 1 else 0  # shared, partly filled: copy-on-write


def _free_list(ctx: Context, alloc, free=None) -> list[int]:
    """The free list as ints (``free``: already read from ``alloc``)."""
    free = alloc.free_blocks if free is None else free
    if not isinstance(free, list | tuple | set | frozenset) and not hasattr(free, "__iter__"):
        ctx.fail(f"free_blocks must be a list of block ids, got {type(free).__name__}")
    return [int(b) for b in free]


def _check_state(ctx: Context, alloc, model: _Model, after: str) -> None:
    """Every invariant of a correct allocator, after operation ``after``."""
    bs = model.block_size
    tables, ref_counts, free_blocks = read_attributes(alloc, "block_tables", "ref_counts",
                                                      "free_blocks")
    if set(tables) != set(model.tokens):
        ctx.fail(f"after {after}: block_tables has sequences {sorted(tables)}, expected "
                 f"{sorted(model.tokens)}")
    held: dict[int, int] = {}
    for seq, table in tables.items():
        table = [int(b) for b in table]
        if len(table) != _cdiv(model.tokens[seq], bs):
            ctx.fail(f"after {after}: sequence {seq} has {model.tokens[seq]} tokens, so "
                     f"ceil({model.tokens[seq]} / {bs}) = {_cdiv(model.tokens[seq], bs)} blocks, "
                     f"but its table is {table}")
        if len(set(table)) != len(table):
            ctx.fail(f"after {after}: sequence {seq}'s table {table} holds a block twice")
        for b in table:
            if not 0 <= b < model.num_blocks:
                ctx.fail(f"after {after}: sequence {seq}'s table {table} holds {b}, not a block id "
                         f"(0 .. {model.num_blocks - 1})")
            held[b] = held.get(b, 0) + 1
    counts = [int(c) for c in ref_counts]
    if len(counts) != model.num_blocks:
        ctx.fail(f"after {after}: ref_counts has {len(counts)} entries, expected one per block "
                 f"({model.num_blocks})")
    for b in range(model.num_blocks):
        if counts[b] != held.get(b, 0):
            owners = [s for s, t in tables.items() if b in t]
            ctx.fail(f"after {after}: block {b} is in the tables of sequences {owners} "
                     f"({held.get(b, 0)} references) but ref_counts[{b}] = {counts[b]}")
    free = _free_list(ctx, alloc, free_blocks)
    if len(set(free)) != len(free):
        twice = sorted({b for b in free if free.count(b) > 1})
        ctx.fail(f"after {after}: block(s) {twice} are on the free list twice (a double free: "
                 "the next two allocations would hand the same block to two sequences)")
    unowned = {b for b in range(model.num_blocks) if counts[b] == 0}
    if set(free) != unowned:
        leaked, busy = sorted(unowned - set(free)), sorted(set(free) - unowned)
        if busy:
            ctx.fail(f"after {after}: block(s) {busy} are on the free list although sequences "
                     "still hold them (a block is free only when its ref count drops to 0)")
        ctx.fail(f"after {after}: block(s) {leaked} have ref count 0 but are not on the free list "
                 "(leaked: they can never be allocated again)")
    for seq, table in tables.items():  # what each sequence reads back from the simulated cache
        got = [model.contents.get(int(b), [None] * bs)[i % bs] for i, b in
               ((i, table[i // bs]) for i in range(model.tokens[seq]))]
        if got != model.history[seq]:
            i = next(i for i, (g, w) in enumerate(zip(got, model.history[seq], strict=True)) if g != w)
            ctx.fail(f"after {after}: sequence {seq} reads position {i} from block "
                     f"{table[i // bs]}, which now holds another sequence's token: a token was "
                     "written into a block that another sequence still uses (a shared, partly "
                     "filled last block needs copy-on-write before the write)")


def _do_allocate(ctx: Context, alloc, model: _Model, seq: int, n: int) -> None:
    table = alloc.allocate(seq, n)
    tables = alloc.block_tables
    if table is None or [int(b) for b in table] != [int(b) for b in tables.get(seq, [])]:
        ctx.fail(f"allocate({seq}, {n}) returned {table!r}; it should return the new block table "
                 f"(block_tables[{seq}])")
    model.tokens[seq] = n
    model.history[seq] = [(seq, i) for i in range(n)]
    for i in range(n):
        b = int(tables[seq][i // model.block_size])
        model.contents.setdefault(b, [None] * model.block_size)[i % model.block_size] = (seq, i)


def _do_append(ctx: Context, alloc, model: _Model, seq: int) -> None:
    tables, ref_counts = read_attributes(alloc, "block_tables", "ref_counts")
    before = [int(b) for b in tables[seq]]
    n, bs = model.tokens[seq], model.block_size
    shared = bool(before) and int(ref_counts[before[-1]]) > 1
    copy = alloc.append(seq)
    tables, ref_counts = read_attributes(alloc, "block_tables", "ref_counts")
    table = [int(b) for b in tables[seq]]
    label = f"append({seq}) (the sequence had {n} tokens, table {before})"
    if len(table) != _cdiv(n + 1, bs):
        ctx.fail(f"{label}: the table is now {table}; for {n + 1} tokens it needs "
                 f"{_cdiv(n + 1, bs)} blocks (a new one exactly when the last one was full)")
    if copy is not None:
        if not isinstance(copy, tuple | list) or len(copy) != 2:
            ctx.fail(f"{label} returned {copy!r}; expected None or a (src, dst) pair")
        src, dst = int(copy[0]), int(copy[1])
        if n % bs == 0:
            ctx.fail(f"{label} returned a copy {copy!r}, but the last block was full: the new "
                     "token goes to a new block, nothing needs copying")
        if not shared:
            ctx.fail(f"{label} copied block {before[-1]}, which it owned alone (ref count 1): "
                     "copy only a block that another sequence shares, else write in place")
        if src != before[-1] or dst != table[-1] or src == dst:
            ctx.fail(f"{label} returned {copy!r}; expected (old last block {before[-1]}, the "
                     f"private copy now at the end of the table {table[-1]})")
        model.contents[dst] = list(model.contents.get(src, [None] * bs))
    elif n % bs != 0 and table[-1] != before[-1]:
        ctx.fail(f"{label} replaced the last block {before[-1]} by {table[-1]} but returned None; "
                 "when it copies a shared block it must return (src, dst) so the caller copies "
                 "the keys and values")
    model.tokens[seq] = n + 1
    model.history[seq].append((seq, n))
    if table[: n // bs] != before[: n // bs]:
        ctx.fail(f"{label}: the table changed from {before} to {table}; full blocks never change")
    target = table[n // bs]
    if int(ref_counts[target]) != 1:
        ctx.fail(f"{label}: the new token goes to block {target}, whose ref count is "
                 f"{int(ref_counts[target])}: a sequence may write only into a block it "
                 "owns alone (copy-on-write)")
    model.contents.setdefault(target, [None] * bs)[n % bs] = (seq, n)


def _do_fork(alloc, model: _Model, parent: int, child: int) -> None:
    alloc.fork(parent, child)
    model.tokens[child] = model.tokens[parent]
    model.history[child] = list(model.history[parent])


def _do_free(alloc, model: _Model, seq: int) -> None:
    alloc.free(seq)
    del model.tokens[seq], model.history[seq]


def _expect_memory_error(ctx: Context, alloc, model: _Model, call: str, fn) -> None:
    snapshot = ({s: list(t) for s, t in alloc.block_tables.items()}, list(alloc.ref_counts),
                sorted(_free_list(ctx, alloc)))
    try:
        fn()
    except MemoryError:
        after = ({s: list(t) for s, t in alloc.block_tables.items()}, list(alloc.ref_counts),
                 sorted(_free_list(ctx, alloc)))
        if after != snapshot:
            ctx.fail(f"{call} raised MemoryError (right) but changed the allocator first; check "
                     "that enough blocks are free before taking any (otherwise the blocks taken "
                     "so far leak)")
        return
    ctx.fail(f"{call} succeeded with only {len(snapshot[2])} free blocks; it needs more: raise "
             "MemoryError when there are not enough free blocks")


def _make(ctx: Context, cls, num_blocks: int, block_size: int):
    alloc = cls(num_blocks, block_size)
    for name in ("free_blocks", "ref_counts", "block_tables"):
        if not hasattr(alloc, name):
            ctx.fail(f"the allocator has no attribute {name!r} (keep the __init__ you were given)")
    return alloc


def _fixed_cases(ctx: Context, cls) -> None:
    ctx.case = "4 blocks of 4 slots: allocate(0, 6)"
    alloc, model = _make(ctx, cls, 4, 4), _Model(4, 4)
    _do_allocate(ctx, alloc, model, 0, 6)
    _check_state(ctx, alloc, model, "allocate(0, 6)")
    ctx.case = "4 blocks of 4 slots: sequence 0 with 6 tokens, append 2 (fills block 2 of 2)"
    for _ in range(2):
        _do_append(ctx, alloc, model, 0)
    _check_state(ctx, alloc, model, "two appends")
    ctx.case = "4 blocks of 4: sequence 0 with 8 tokens (2 full blocks), append one more"
    _do_append(ctx, alloc, model, 0)
    _check_state(ctx, alloc, model, "the 9th token")
    ctx.case = "4 blocks of 4: fork(0, 1) of a 9-token sequence, then append to the child"
    _do_fork(alloc, model, 0, 1)
    _check_state(ctx, alloc, model, "fork(0, 1)")
    _do_append(ctx, alloc, model, 1)  # shared, partly filled last block: copy-on-write
    _check_state(ctx, alloc, model, "append(1) after the fork")
    ctx.case = "4 blocks of 4: after the copy-on-write, append to the parent (it owns its block again)"
    _do_append(ctx, alloc, model, 0)
    _check_state(ctx, alloc, model, "append(0)")
    ctx.case = "4 blocks of 4, all 4 in use: allocate(2, 1) must fail"
    _expect_memory_error(ctx, alloc, model, "allocate(2, 1)", lambda: alloc.allocate(2, 1))
    ctx.case = "4 blocks of 4: free(1), the child (its private block returns, the shared ones stay)"
    _do_free(alloc, model, 1)
    _check_state(ctx, alloc, model, "free(1)")
    ctx.case = "4 blocks of 4: free(0) returns every block"
    _do_free(alloc, model, 0)
    _check_state(ctx, alloc, model, "free(0)")
    if len(set(_free_list(ctx, alloc))) != 4:
        ctx.fail("after freeing every sequence, all 4 blocks must be free again")
    ctx.case = "4 blocks of 4: free(0) again (a sequence freed twice)"
    try:
        alloc.free(0)
    except KeyError:
        pass
    else:
        ctx.fail("freeing a sequence that holds no blocks must raise KeyError (a double free), "
                 "not pass silently")
    _check_state(ctx, alloc, model, "the second free(0)")
    ctx.case = "3 blocks of 2: allocate(0, 7) needs 4 blocks"
    alloc, model = _make(ctx, cls, 3, 2), _Model(3, 2)
    _expect_memory_error(ctx, alloc, model, "allocate(0, 7)", lambda: alloc.allocate(0, 7))
    ctx.case = "2 blocks of 2: a full pool, then append to a sequence whose last block is full"
    alloc, model = _make(ctx, cls, 2, 2), _Model(2, 2)
    _do_allocate(ctx, alloc, model, 5, 4)
    _expect_memory_error(ctx, alloc, model, "append(5)", lambda: alloc.append(5))
    ctx.case = "2 blocks of 2: fork a 3-token sequence in a full pool, then append to the child"
    alloc, model = _make(ctx, cls, 2, 2), _Model(2, 2)
    _do_allocate(ctx, alloc, model, 0, 3)
    _do_fork(alloc, model, 0, 1)
    _expect_memory_error(ctx, alloc, model, "append(1) (needs a copy, no block free)",
                         lambda: alloc.append(1))


def _random_run(ctx: Context, cls, seed: int) -> None:
    rng = ctx.rng(seed)
    num_blocks, block_size = rng.choice(RUN_SHAPES)
    if ctx.hidden:  # a pool and block size of the instructor's seed, often none of the above
        block_size = rng.choice([1, 2, 3, 4, 5, 6, 8])
        num_blocks = rng.randint(max(4, 24 // block_size), min(30, max(8, 96 // block_size)))
    where = f"hidden run {seed - 600}" if ctx.hidden else f"seed {seed}"
    alloc, model = _make(ctx, cls, num_blocks, block_size), _Model(num_blocks, block_size)
    next_id, log = 0, []
    for _ in range(RANDOM_OPS):
        live = sorted(model.tokens)
        op = rng.choices(["allocate", "append", "fork", "free"],
                         weights=[3, 8 if live else 0, 2 if live else 0, 2 if live else 0])[0]
        free = len(set(_free_list(ctx, alloc)))
        if op == "allocate":
            n = rng.randint(1, 3 * block_size)
            call = f"allocate({next_id}, {n})"
            log.append(call)
            ctx.case = f"random run ({where}, {num_blocks} blocks of {block_size}): ... " \
                       f"{'; '.join(log[-6:])}"
            if _cdiv(n, block_size) > free:
                _expect_memory_error(ctx, alloc, model, call,
                                     lambda seq=next_id, n=n: alloc.allocate(seq, n))
            else:
                _do_allocate(ctx, alloc, model, next_id, n)
                next_id += 1
        elif op == "append":
            seq = rng.choice(live)
            call = f"append({seq})"
            log.append(call)
            ctx.case = f"random run ({where}, {num_blocks} blocks of {block_size}): ... " \
                       f"{'; '.join(log[-6:])}"
            if model.blocks_needed_to_append(alloc, seq) > free:
                _expect_memory_error(ctx, alloc, model, call, lambda seq=seq: alloc.append(seq))
            else:
                _do_append(ctx, alloc, model, seq)
        elif op == "fork":
            parent = rng.choice(live)
            log.append(f"fork({parent}, {next_id})")
            ctx.case = f"random run ({where}, {num_blocks} blocks of {block_size}): ... " \
                       f"{'; '.join(log[-6:])}"
            _do_fork(alloc, model, parent, next_id)
            next_id += 1
        else:
            seq = rng.choice(live)
            log.append(f"free({seq})")
            ctx.case = f"random run ({where}, {num_blocks} blocks of {block_size}): ... " \
                       f"{'; '.join(log[-6:])}"
            _do_free(alloc, model, seq)
        _check_state(ctx, alloc, model, log[-1])
    for seq in sorted(model.tokens):
        _do_free(alloc, model, seq)
    ctx.case = f"random run ({where}): every sequence freed at the end"
    _check_state(ctx, alloc, model, "freeing everything")
    if len(set(_free_list(ctx, alloc))) != num_blocks:
        ctx.fail(f"all {num_blocks} blocks must be free at the end")


@check("block allocator (allocate / append / fork / free)", POINTS["block_allocator"])
def check_block_allocator(ctx: Context, cls) -> None:
    """``cls(num_blocks, block_size)``: a block allocator with reference counts.

    Attributes: ``free_blocks`` (list of free block ids), ``ref_counts`` (one int per block),
    ``block_tables`` (dict seq_id -> list of block ids), ``num_tokens`` (dict seq_id -> int).
    Methods: ``allocate(seq_id, num_tokens) -> table``, ``append(seq_id) -> None | (src, dst)``,
    ``fork(parent_id, child_id)``, ``free(seq_id)``; MemoryError (with nothing changed) when
    blocks run out, KeyError when freeing an unknown sequence. Checked on fixed cases, then on
    :data:`RANDOM_RUNS` seeded random interleavings of :data:`RANDOM_OPS` operations.
    """
    _fixed_cases(ctx, cls)
    for run in range(RANDOM_RUNS):
        _random_run(ctx, cls, seed=600 + run)


# --- exercise (b): the slot mapping -----------------------------------------------------------


def _slot_cases(ctx: Context, seed: int = 610) -> list[tuple[list[int], int, int, int]]:
    """(block_table, start, num_tokens, block_size): hand-picked edges, then random ones (of the
    instructor's seed in hidden mode, with other block sizes and pool sizes too)."""
    cases = [([7], 0, 1, 16), ([3, 0, 5], 0, 9, 4), ([3, 0, 5], 4, 1, 4), ([3, 0, 5], 3, 2, 4),
             ([2, 9], 15, 2, 16), ([4, 1, 6, 2], 11, 5, 4), ([0, 1, 2], 0, 3, 1)]
    gen = ctx.rng(seed)
    block_sizes = ctx.pick([1, 2, 4, 8, 16, 32], [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32], seed=611)
    num_blocks = ctx.pick(64, 40, 50, 80, 100, 128, seed=612)
    for _ in range(ctx.pick(40, 36, 44, 48, seed=613)):
        bs = gen.choice(block_sizes)
        length = gen.randint(1, 6 * bs)
        table = gen.sample(range(num_blocks), _cdiv(length, bs) + gen.randint(0, 2))
        start = gen.randint(0, length - 1)
        cases.append((table, start, gen.randint(1, length - start), bs))
    return cases


@check("slot mapping", POINTS["slot_mapping"])
def check_slot_mapping(ctx: Context, fn) -> None:
    """``fn(block_table, start, num_tokens, block_size) -> slots``: the cache slot of positions
    ``start .. start + num_tokens - 1``, ``block_table[p // block_size] * block_size +
    p % block_size``, as a list of ints (or a 1-D integer tensor)."""
    for table, start, n, bs in _slot_cases(ctx):
        ctx.case = f"block_table={table}, start={start}, num_tokens={n}, block_size={bs}"
        want = reference_slot_mapping(table, start, n, bs)
        got = fn(list(table), start, n, bs)
        if isinstance(got, torch.Tensor):
            if got.dim() != 1 or got.is_floating_point():
                ctx.fail(f"expected a list of ints or a 1-D integer tensor, got {got.dtype} of "
                         f"shape {tuple(got.shape)}")
            got = got.tolist()
        if not isinstance(got, list | tuple) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                        for s in got):
            ctx.fail(f"expected a list of ints, got {got!r}")
        got = list(got)
        if len(got) != n:
            ctx.fail(f"expected {n} slots (one per new token), got {len(got)}")
        if got != want:
            i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
            p = start + i
            ctx.fail(f"position {p} (logical block {p // bs}, offset {p % bs}) should be slot "
                     f"block_table[{p // bs}] * {bs} + {p % bs} = {want[i]}, got {got[i]}")


# --- exercise (c): paged attention for one sequence -------------------------------------------


#: (block_size, H, D, num_blocks, context_len) of the visible cases.
ATTENTION_SHAPES = [(1, 1, 4, 8, 1), (2, 2, 4, 8, 8), (4, 3, 16, 16, 17), (8, 2, 8, 32, 64),
                    (16, 4, 16, 64, 100), (1, 2, 1, 24, 5), (4, 1, 2, 20, 13), (32, 2, 4, 16, 31)]


def _hidden_attention_shape(rng: random.Random) -> tuple[int, int, int, int, int]:
    """A shape of the same kind and size as :data:`ATTENTION_SHAPES`, drawn from ``rng``."""
    block_size = rng.choice([1, 2, 3, 4, 5, 8, 12, 16, 32])
    L = rng.randint(1, min(100, 24 * block_size))
    num_blocks = _cdiv(L, block_size) + rng.randint(1, 12)  # always blocks nobody uses
    return block_size, rng.randint(1, 4), rng.choice([1, 2, 3, 4, 6, 8, 16]), num_blocks, L


def _attention_cases(ctx: Context, seed: int = 620):
    """(label, q [H, D], k_cache, v_cache, block table row padded with -1, context_len)."""
    gen = ctx.generator(seed)
    rng = ctx.rng(seed)
    cases = []
    shapes = ATTENTION_SHAPES
    if ctx.hidden:
        shape_rng = ctx.rng(seed + 1)
        shapes = [_hidden_attention_shape(shape_rng) for _ in ATTENTION_SHAPES]
    for block_size, H, D, num_blocks, L in shapes:
        used = _cdiv(L, block_size)
        row = rng.sample(range(num_blocks), used) + [-1] * rng.randint(1, 3)
        # every slot holds random values, including the unused tail of the last block and the
        # blocks no one uses: reading any of them changes the answer
        k_cache = torch.randn(num_blocks, block_size, H, D, generator=gen) * 1.5
        v_cache = torch.randn(num_blocks, block_size, H, D, generator=gen)
        q = torch.randn(H, D, generator=gen) * 1.5
        label = f"block_size={block_size}, H={H}, D={D}, context_len={L}, block_table={row}"
        cases.append((label, q, k_cache, v_cache, row, L))
    return cases


@check("paged attention for one sequence", POINTS["paged_attention"])
def check_paged_attention(ctx: Context, fn) -> None:
    """``fn(q, k_cache, v_cache, block_table, context_len) -> out``: q [H, D]; caches
    [num_blocks, block_size, H, D]; block_table a list of block ids whose entries past
    ``ceil(context_len / block_size)`` are padding (-1); out [H, D] =
    softmax(q . K^T / sqrt(D)) V over the context_len gathered keys and values. Compared with
    :func:`paged_decode_attention_reference`."""
    for label, q, k_cache, v_cache, row, L in _attention_cases(ctx):
        ctx.case = label
        table = torch.tensor([row], dtype=torch.int32)
        want = paged_decode_attention_reference(q[None], k_cache, v_cache, table,
                                                torch.tensor([L], dtype=torch.int32))[0]
        got = fn(q.clone(), k_cache.clone(), v_cache.clone(), list(row), L)
        got = expect_tensor(ctx, got, "out", shape=tuple(q.shape)).float()
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            ctx.case += _attention_hint(got, q, k_cache, v_cache, row, L)
        expect_close(ctx, got, want, "out", rtol=1e-4, atol=1e-5)


def _attention_hint(got, q, k_cache, v_cache, row: list[int], L: int) -> str:
    """Name the mistake when ``got`` matches a known wrong answer."""
    block_size, D = k_cache.shape[1], q.shape[-1]
    used = _cdiv(L, block_size)

    def ref(q=q, row=row, L=L, scale=None):
        return paged_decode_attention_reference(q[None], k_cache, v_cache,
                                                torch.tensor([row], dtype=torch.int32),
                                                torch.tensor([L], dtype=torch.int32), scale)[0]

    candidates = [
        (lambda: ref(scale=1.0), "forget to scale the scores by 1/sqrt(D)?"),
        (lambda: ref(scale=1.0 / D), "scale the scores by 1/D instead of 1/sqrt(D)?"),
        (lambda: ref(L=used * block_size), f"attend to all {used * block_size} slots of the "
         f"{used} blocks? Only the first context_len = {L} hold tokens, the last block is partly "
         "filled"),
        (lambda: ref(row=[b % k_cache.shape[0] for b in row], L=len(row) * block_size),
         "read every entry of block_table, the padding (-1) too? Only the first "
         f"ceil(context_len / block_size) = {used} entries are blocks of this sequence"),
        (lambda: ref(row=sorted(row[:used]) + row[used:]), "take the blocks in the order of their "
         "ids? Logical block i is block_table[i], whatever its id"),
        (lambda: ref(row=list(range(used)) + row[used:]), "read blocks 0, 1, 2, ... as if the cache "
         "were contiguous? Logical block i is stored in physical block block_table[i]"),
    ]
    for make, hint in candidates:
        try:
            if torch.allclose(got, make(), rtol=1e-4, atol=1e-5):
                return f" (did you {hint})"
        except (RuntimeError, ValueError, IndexError):
            continue
    return ""
