"""``course-lib serve``: load a model (optionally a chapter 3 quantized checkpoint) and serve it.

Runs the app of :mod:`course_lib.serving.api` under uvicorn with a graceful shutdown, the way a
Kubernetes pod is stopped: on SIGTERM (or Ctrl-C) ``/health`` turns 503 and new requests get
503, requests in flight run to their end for up to ``--shutdown-timeout`` seconds, then the
process exits. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

import uvicorn

from course_lib import runtime
from course_lib.serving.api import ServerState, create_app
from course_lib.serving.engine import LLMEngine
from course_lib.serving.guard import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger("course_lib.serving")

#: Seconds between forced GIL hand-overs in the server process (Python's default is 0.005).
GIL_SWITCH_INTERVAL = 0.001

#: Checkpoint architectures (``quant_config.json``'s ``model.architecture``) -> model family.
ARCHITECTURE_FAMILIES = {"course_lib.GPT": "gpt2", "GPT2LMHeadModel": "gpt2",
                         "course_lib.Llama": "llama", "LlamaForCausalLM": "llama",
                         "Qwen2ForCausalLM": "llama"}


def check_checkpoint(quantized: str, model: str, loaded: str | None = None) -> dict:
    """The config of the quantized checkpoint ``quantized``, after checking it was made from
    ``model``: a ValueError (or FileNotFoundError) saying what differs otherwise.

    Reads only the checkpoint's metadata. ``loaded`` is the name of the model really loaded for
    ``model`` (an offline stand-in, see :func:`course_lib.models.hub.resolve`); when the
    checkpoint records the name it was quantized from, the two must be the same. Either way,
    the family (GPT-2 or LLaMA) must be ``model``'s; the shapes are compared on loading.
    """
    from course_lib.models.hub import family
    from course_lib.quant.checkpoint import read_config

    config, file = read_config(quantized)
    spec = config.get("model") or {}
    arch, name = spec.get("architecture"), spec.get("name")
    if loaded is not None and name and name != loaded:
        shown = f"{model!r}" + (f" (loaded as {loaded!r})" if loaded != model else "")
        raise ValueError(f"--quantized {quantized} was quantized from {name!r}, not from --model "
                         f"{shown}: serve it with --model {name}")
    expected, found = family(model), ARCHITECTURE_FAMILIES.get(arch)
    if found is not None and found != expected:
        raise ValueError(f"--quantized {quantized} holds a {found} model ({arch}"
                         f"{f', quantized from {name!r}' if name else ''}), but --model {model} is "
                         f"a {expected} model: pass the --model it was quantized from")
    return config


def engine_loader(model: str = "tiny", quantized: str | None = None, device: str | None = None,
                  **engine_kwargs) -> Callable[[], LLMEngine]:
    """A function that loads ``model`` (its quantized checkpoint if given) into an engine.

    Any family :func:`course_lib.models.families.from_hf` knows: the HF model's weights are
    copied into the course's :class:`GPT` or :class:`Llama`, whose paged forward the engine runs.
    """
    def load() -> LLMEngine:
        from course_lib.models.families import from_hf
        from course_lib.models.hub import load_model

        hf_model, tokenizer = load_model(model, device=device)
        loaded = getattr(hf_model, "course_name", model)
        course_model = from_hf(hf_model)
        if quantized:
            from course_lib.quant.checkpoint import load_quantized

            check_checkpoint(quantized, model, loaded)
            # our models use HF's layer names (GPT-2's transformer.h.0.attn.c_attn, LLaMA's
            # model.layers.0.self_attn.q_proj), so the checkpoint's QuantLinear layers drop in
            try:
                course_model = load_quantized(course_model, quantized).to(hf_model.device)
            except ValueError as exc:
                raise ValueError(f"--quantized {quantized} does not fit --model {model}: {exc}") from None
        log.info("serving %s%s on %s", loaded, f" quantized from {quantized}" if quantized else "",
                 hf_model.device)
        engine = LLMEngine(course_model, tokenizer, **engine_kwargs)
        engine.warm_up()  # with --compile-decode: compile before /health says ready
        return engine
    return load


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain on the first SIGTERM / SIGINT (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.draining = False
        self.failed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.draining or self._loop is None:
            return super().handle_exit(sig, frame)
        self.draining = True
        self.state.begin_drain()
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        engine = self.state.engine
        n = engine.num_unfinished if engine is not None else 0
        log.info("shutting down: %d request(s) in flight, waiting up to %.0f s", n,
                 self.shutdown_timeout)
        if engine is not None and not await engine.wait_until_idle(self.shutdown_timeout):
            log.warning("shutdown timeout: %d request(s) still running are cut off",
                        engine.num_unfinished)
            engine.abort_all(f"the server shut down before this request finished "
                             f"(--shutdown-timeout {self.shutdown_timeout:g} s)")
            await engine.wait_until_idle(2.0)  # let the error chunks go out
            await asyncio.sleep(0.2)
        self.should_exit = True

    def fatal_error(self, exc: BaseException) -> None:
        """The model failed to load or the engine died: exit (code 1) so it can be restarted.
        Called from a worker thread; uvicorn polls ``should_exit``."""
        self.failed = True
        self.should_exit = True


def serve_cli(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM / Ctrl-C; 0 after a clean shutdown, 1 if loading failed or
    the engine died."""
    if args.quantized:  # a missing or foreign checkpoint: say so now, not after loading the model
        try:
            check_checkpoint(args.quantized, args.model)
        except (ValueError, FileNotFoundError) as exc:
            print(f"course-lib serve: error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # The engine thread and the event loop share the GIL; a thread waiting for it waits up to
    # the switch interval (5 ms by default), a big slice of a CPU decode step. Hand over sooner.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    runtime.use_cpu_threads(getattr(args, "threads", None), shared=True, device=args.device)  # + event loop
    load = engine_loader(args.model, args.quantized, args.device, num_blocks=args.num_blocks,
                         block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens, record_steps=1000,
                         compile_decode=getattr(args, "compile_decode", False))
    holder: dict[str, DrainingServer] = {}
    try:
        app = create_app(load, args.served_model_name or args.model, api_key=args.api_key,
                         max_queue=args.max_queue,
                         max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                         on_fatal_error=lambda exc: holder["server"].fatal_error(exc))
    except ValueError as exc:  # e.g. an empty API key
        print(f"course-lib serve: error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=2)
    server = holder["server"] = DrainingServer(config, app.state.server, args.shutdown_timeout)
    server.run()
    return 1 if server.failed else 0
