"""Compiled decode (course_lib.serving.compiled_decode): decode-only engine steps traced whole by
TorchDynamo (fullgraph: no graph break, so no host sync or Python list in the step), giving the
eager engine's greedy tokens on both model families; the scratch block keeps padding rows away
from every sequence's blocks; without a compiler the engine says so once and stays eager."""

from __future__ import annotations

import pytest
import torch
from test_llama import _models

from course_lib.serving import compiled_decode
from course_lib.serving.engine import LLMEngine, SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 17, 9, 33, 5)]


class Counted:
    """The engine's compiled decode, counting the rows of each step it serves."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def accepts(self, n: int, max_blocks: int = 1) -> bool:
        return self.inner.accepts(n, max_blocks)

    def __call__(self, tokens, positions, tables):
        self.rows.append(len(tokens))
        return self.inner(tokens, positions, tables)


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa3-linear"])
def test_traced_decode_gives_the_eager_tokens(family, tiny_target):
    model = tiny_target[0] if family == "gpt2" else _models(family)[1]
    prompts = prompts_for(model.config.vocab_size)
    want = LLMEngine(model, num_blocks=40, block_size=4).generate(prompts, PARAMS, progress=False)
    # few blocks: sequences reuse blocks freed by others, where stale K/V would show
    engine = LLMEngine(model, num_blocks=40, block_size=4, max_num_seqs=3, compile_decode="eager")
    engine.compiled = counted = Counted(engine.compiled)
    got = engine.generate(prompts, PARAMS, progress=False)
    assert [o.output_token_ids for o in got] == [o.output_token_ids for o in want]
    assert sum(counted.rows) > 20 and len(set(counted.rows)) > 1  # steps of several sizes compiled


def test_padding_rows_write_only_the_scratch_block(tiny_target):
    model = tiny_target[0]
    engine = LLMEngine(model, num_blocks=16, block_size=4, compile_decode="eager")
    assert engine.cache.num_blocks == 17 and engine.compiled.scratch_block == 16
    before = engine.cache.k[:, :16].clone()
    engine.compiled([5, 6, 7], [0, 0, 0], [[3], [9], [12]])  # 3 rows, padded to a bucket of 4
    changed = (engine.cache.k[:, :16] != before).flatten(3).any(-1).any(0)  # [blocks, slots]
    assert changed.nonzero().tolist() == [[3, 0], [9, 0], [12, 0]]
    assert engine.cache.k[:, 16].abs().sum() > 0  # the padding row went to the scratch block


def test_inductor_compiles_the_decode_step(tiny_target):
    reason = compiled_decode.compile_unavailable(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    model = tiny_target[0]
    prompts = prompts_for(model.config.vocab_size)[:3]
    want = LLMEngine(model, num_blocks=40).generate(prompts, PARAMS, progress=False)
    engine = LLMEngine(model, num_blocks=40, compile_decode=True)
    got = engine.generate(prompts, PARAMS, progress=False)
    assert engine.compiled is not None  # it compiled, and stayed on
    assert [o.output_token_ids for o in got] == [o.output_token_ids for o in want]


def test_no_compiler_one_line_and_eager(tiny_target, monkeypatch, capsys):
    monkeypatch.setattr(compiled_decode, "compile_unavailable", lambda device: "no C++ compiler (test)")
    engine = LLMEngine(tiny_target[0], num_blocks=40, compile_decode=True)
    assert engine.compiled is None
    assert "compiled decode off: no C++ compiler (test); the engine runs eager" in capsys.readouterr().err
    assert engine.generate([[5, 6, 7]], PARAMS, progress=False)[0].num_output_tokens == 10


def test_a_failed_first_compile_falls_back_to_eager(tiny_target, capsys):
    model = tiny_target[0]
    want = LLMEngine(model, num_blocks=40).generate([[5, 6, 7]], PARAMS, progress=False)
    engine = LLMEngine(model, num_blocks=40, compile_decode="eager")

    def broken(idx, meta):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    engine.compiled.forward = broken
    got = engine.generate([[5, 6, 7]], PARAMS, progress=False)
    assert got[0].output_token_ids == want[0].output_token_ids and engine.compiled is None
    assert "compiled decode off: compiling failed (RuntimeError: InvalidCxxCompiler" in capsys.readouterr().err


def test_buckets_and_the_cpu_batch_cap(tiny_target):
    assert [compiled_decode.bucket_for(n) for n in (1, 2, 3, 9, 256)] == [2, 2, 4, 16, 256]
    assert compiled_decode.bucket_for(257) is None
    engine = LLMEngine(tiny_target[0], num_blocks=40, compile_decode="eager")
    cap, keys = compiled_decode.CPU_MAX_BATCH, compiled_decode.CPU_MAX_KEYS
    assert engine.compiled.accepts(cap) and not engine.compiled.accepts(cap + 1)
    blocks = keys // (cap * engine.cache.block_size)  # the widest table 16 rows may have
    assert engine.compiled.accepts(cap, blocks) and not engine.compiled.accepts(cap, blocks + 1)


def test_warm_up_compiles_before_any_request_and_touches_no_owned_block(tiny_target):
    engine = LLMEngine(tiny_target[0], num_blocks=16, block_size=4, compile_decode="eager")
    engine.warm_up()
    assert engine.cache.k[:, :16].abs().sum() == 0 and engine.cache.k[:, 16].abs().sum() > 0
    assert engine.compiled is not None and engine._compiled_ran


def test_no_graph_compiles_while_serving_after_warm_up(tiny_target):
    """Warm-up leaves one graph for every later decode step: batches of 1..16 rows and tables of
    1..n blocks (sizes of 1 are padded away; batch and width become two symbols), so a served
    step never stalls on a compile."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = tiny_target[0]
    engine = LLMEngine(model, num_blocks=80, block_size=4, compile_decode=counting_backend)
    engine.warm_up()
    assert graphs, "warm-up compiled nothing"
    compiled = len(graphs)
    g = torch.Generator().manual_seed(1)
    for rows in (1, 2, 5, 16):  # short prompts (1-block tables) and long ones, batch 1 included
        prompts = [torch.randint(1, 500, (int(torch.randint(1, 40, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(rows)]
        engine.generate(prompts, PARAMS, progress=False)
    assert engine.compiled is not None and len(graphs) == compiled
