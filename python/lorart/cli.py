"""The ``lorart`` command line.

Flags mirror TensorRT-LLM's scripts so its users feel at home: ``lorart convert`` is
``hf_lora_convert.py`` (``-i ADAPTER_DIR -o OUT_DIR --storage-type float16``), ``lorart run`` is
``examples/run.py``.

Every error caused by the input (a path, a flag value, a file's contents) prints one
``lorart <command>: error: ...`` line on stderr and exits with status 2; SIGINT and SIGTERM stop
the work in progress, print one line and exit with 130 and 143.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorart import __version__, hf, lora
from lorart._core import DeviceError, ModelConfig

if TYPE_CHECKING:  # lorart.llm imports tokenizers; the CLI imports it only when it runs a model
    from tokenizers import Tokenizer

    from lorart.llm import LLM, GenerationOutput

logger = logging.getLogger("lorart")

# What bad input raises anywhere below the CLI (LoraError and json's errors are ValueErrors).
# Anything else is a bug in lorart and keeps its traceback.
USER_ERRORS = (ValueError, OSError, DeviceError)

# run.py's --log_level choices, plus Python's own names.
_LOG_LEVELS = {
    "verbose": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "internal_error": logging.CRITICAL,
}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised in the main thread so the work in progress unwinds
    (``LLM`` cancels its requests) the same way for both."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_logging = _configure_logging(args.log_level, args.quiet)
    restore_signals = _install_signal_handlers()
    try:
        return args.run(args)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        sys.stdout.flush()
        print(
            f"lorart {args.command}: interrupted by {signal.Signals(signum).name}; stopped",
            file=sys.stderr,
        )
        return 128 + signum
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line, always
        print(f"lorart {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        restore_signals()
        restore_logging()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorart", description="multi-LoRA inference runtime")
    parser.add_argument("--version", action="version", version=f"lorart {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log_level",
        "--log-level",
        default="info",
        choices=list(_LOG_LEVELS),
        help="messages on stderr from this level up (default: info)",
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only; no progress bars"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="convert a PEFT LoRA adapter to the TensorRT-LLM .npy pair",
        description="Convert a PEFT LoRA adapter directory to model.lora_weights.npy and "
        "model.lora_config.npy (TensorRT-LLM's hf_lora_convert.py format).",
    )
    convert.add_argument(
        "-i",
        "--in-file",
        "--in_file",
        dest="in_dir",
        required=True,
        help="PEFT adapter directory (adapter_config.json + weights)",
    )
    convert.add_argument(
        "-o",
        "--out-dir",
        "--out_dir",
        dest="out_dir",
        required=True,
        help="directory to write the .npy pair to",
    )
    convert.add_argument(
        "--storage-type",
        "--storage_type",
        dest="storage_type",
        default="float16",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the written weights (default: float16)",
    )
    convert.add_argument(
        "--model_dir",
        "--model-dir",
        dest="model_dir",
        default=None,
        help="optional HF model dir: check every shape against its config.json",
    )
    convert.set_defaults(run=_convert)

    run = commands.add_parser(
        "run",
        parents=[common],
        help="generate text with a base model and LoRA adapters (TensorRT-LLM run.py flags)",
        description="Generate for each --input_text (or each prompt of --input_file); "
        "--lora_task_uids picks, per input, the index of a --lora_dir adapter or -1 for the "
        "base model. All inputs run as one mixed batch.",
    )
    _add_run_flags(run)
    run.set_defaults(run=_run)

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="an OpenAI-compatible multi-LoRA HTTP server",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, runtime adapter "
        "loading (/v1/load_lora_adapter, /v1/unload_lora_adapter), /health and /metrics. "
        "A request's 'model' names the base model (--served-model-name) or an adapter.",
    )
    _add_serve_flags(serve)
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="the embedded multi-LoRA demo: base, Chinese, Japanese and Korean adapters in one "
        "batch",
        description="Runs the seed tutorial's table offline on the tiny model shipped with "
        "lorart: the same Chinese and Japanese question three times each, with task uids "
        "-1 0 1 -1 0 1, and a Korean question with an adapter that brings its own vocabulary "
        "and tokenizer (task uid 2), in one mixed batch.",
    )
    demo.add_argument("--max_output_len", type=int, default=12)
    _add_threads_flag(demo)
    demo.set_defaults(run=_demo)
    return parser


def _configure_logging(level: str, quiet: bool) -> Callable[[], None]:
    """Send the ``lorart`` logger's records to stderr; returns what undoes it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    previous = logger.level
    logger.setLevel(max(_LOG_LEVELS[level], logging.WARNING) if quiet else _LOG_LEVELS[level])
    logger.addHandler(handler)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    return restore


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"lorart: {level}{record.getMessage()}"


def _install_signal_handlers() -> Callable[[], None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` once; a second signal while the first
    unwinds ends the process at once (for a shutdown that hangs)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    seen: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if seen:
            os._exit(128 + seen[0])
        seen.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


# ---------------------------------------------------------------------------------------------
# lorart convert


def _convert(args: argparse.Namespace) -> int:
    model_config = None
    if args.model_dir:
        _check_dir(args.model_dir, "--model_dir")
        model_config = _flagged("--model_dir", args.model_dir, hf.load_config, args.model_dir)
    _check_dir(args.in_dir, "-i/--in-file")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o/--out-dir {out}: exists and is not a directory")
    start = time.monotonic()
    weights, config = lora.from_peft(args.in_dir, model_config, dtype=args.storage_type)
    written = lora.save_npy(out, weights, config)
    # An adapter with its own vocabulary needs its own tokenizer: keep them together, and never
    # leave another adapter's tokenizer files beside these weights.
    copied = []
    for name in lora.TOKENIZER_FILES:
        src, dst = Path(args.in_dir) / name, out / name
        if src.is_file():
            shutil.copyfile(src, dst)
            copied.append(dst)
        elif dst.is_file() or dst.is_symlink():
            dst.unlink()
    logger.info("converted in %.2f s", time.monotonic() - start)
    print(
        f"converted {args.in_dir}: {config.num_rows} rows, max_row {weights.shape[1]}, "
        f"{weights.dtype}"
    )
    shapes = {lora.WEIGHTS_FILE: [1, *weights.shape], lora.CONFIG_FILE: [1, *config.shape]}
    for part, name in lora.EMBEDDING_FILES.items():
        value = getattr(weights.embeddings, part) if weights.embeddings is not None else None
        if value is not None:
            shapes[name] = list(value.shape)
    for path in written:
        print(f"wrote {path} {shapes[path.name]}")
    for path in copied:
        print(f"copied {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# lorart run


def _add_run_flags(run: argparse.ArgumentParser) -> None:
    model = run.add_argument_group("model")
    model.add_argument("--model_dir", default=None, help="HF checkpoint directory")
    model.add_argument(
        "--hf_model_dir", default=None, help="the same as --model_dir (run.py's spelling)"
    )
    model.add_argument(
        "--engine_dir",
        default=None,
        help="the same as --model_dir, for run.py command lines; with --model_dir or "
        "--hf_model_dir it is ignored (lorart runs the HF checkpoint, there is no engine)",
    )
    model.add_argument(
        "--tokenizer_dir",
        default=None,
        help="directory with tokenizer.json (default: the model dir)",
    )
    model.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N (a build with the CUDA backend and a GPU)",
    )
    model.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="how the weights are stored (default: auto, the checkpoint's own dtype)",
    )
    model.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16"],
        help="matmul precision: float32 (exact, the default) or bfloat16 (bf16 dot products)",
    )
    model.add_argument(
        "--kv_cache_dtype",
        default="float32",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="how cached keys/values are stored (default: float32; auto: float32 on the CPU, "
        "bfloat16 on CUDA)",
    )

    inputs = run.add_argument_group("inputs")
    inputs.add_argument("--input_text", nargs="+", default=None, help="one or more prompts")
    inputs.add_argument(
        "--input_file",
        default=None,
        help=".txt: one prompt per line; .csv: one prompt of token ids per line; .npy: "
        "[prompts, len] token ids, padding removed (run.py's formats)",
    )
    inputs.add_argument(
        "--max_input_length",
        type=int,
        default=923,
        help="keep the last N tokens of longer prompts, as run.py does (default: 923)",
    )
    inputs.add_argument("--no_add_special_tokens", action="store_true")

    adapters = run.add_argument_group("LoRA")
    adapters.add_argument(
        "--lora_dir", nargs="*", default=[], help="PEFT adapter or converted .npy directories"
    )
    adapters.add_argument(
        "--lora_task_uids",
        nargs="*",
        default=None,
        help="per input: index into --lora_dir, or -1 for the base model",
    )
    adapters.add_argument(
        "--lora_ckpt_source",
        default="hf",
        choices=["hf", "nemo"],
        help="hf: PEFT directories (or lorart convert's .npy pair); nemo is not supported",
    )

    generation = run.add_argument_group("generation")
    generation.add_argument("--max_output_len", type=int, default=32)
    generation.add_argument(
        "--top_k", type=int, default=1, help="1 = greedy (default), 0 = no limit"
    )
    generation.add_argument("--top_p", type=float, default=0.0, help="0 = off (as in run.py)")
    generation.add_argument("--temperature", type=float, default=1.0)
    generation.add_argument("--random_seed", type=int, default=0)
    generation.add_argument(
        "--num_beams", type=int, default=1, help="1 only: beam search is not supported"
    )
    generation.add_argument(
        "--streaming", action="store_true", help="print each output as its tokens arrive"
    )
    generation.add_argument(
        "--run_profiling",
        action="store_true",
        help="run the batch 10 more times and print the average latency (as run.py does)",
    )
    generation.add_argument(
        "--use_py_session", action="store_true", help="accepted for run.py compatibility; no effect"
    )
    _add_threads_flag(run)


def _add_serve_flags(serve: argparse.ArgumentParser) -> None:
    from lorart.demo import DEMO

    serve.add_argument(
        "--model_dir",
        "--model-dir",
        dest="model_dir",
        default=str(DEMO / "model"),
        help="HF checkpoint directory (default: the embedded demo model)",
    )
    serve.add_argument("--tokenizer_dir", "--tokenizer-dir", dest="tokenizer_dir", default=None)
    serve.add_argument(
        "--lora-modules",
        "--lora_modules",
        dest="lora_modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="adapters served from the start: PEFT or converted .npy directories",
    )
    serve.add_argument(
        "--lora-root",
        "--lora_root",
        dest="lora_root",
        default=None,
        help="directory /v1/load_lora_adapter may load from (without it runtime loading is off)",
    )
    serve.add_argument("--api-key", dest="api_key", default=None, help="required Bearer token")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    _add_threads_flag(serve)
    serve.add_argument(
        "--max-batch-size", "--max_batch_size", dest="max_batch_size", type=int, default=8
    )
    serve.add_argument(
        "--max-num-tokens",
        "--max_num_tokens",
        dest="max_num_tokens",
        type=int,
        default=None,
        help="tokens per step (default: the executor's)",
    )
    serve.add_argument(
        "--max-seq-len",
        "--max_seq_len",
        dest="max_seq_len",
        type=int,
        default=None,
        help="prompt + output tokens (default: the model's)",
    )
    serve.add_argument(
        "--max-lora-rank", "--max_lora_rank", dest="max_lora_rank", type=int, default=64
    )
    serve.add_argument(
        "--max-queue",
        "--max_queue",
        dest="max_queue",
        type=int,
        default=256,
        help="requests held at once; more are refused with 429",
    )
    serve.add_argument(
        "--served-model-name",
        "--served_model_name",
        dest="served_model_name",
        default=None,
        help="the base model's name (default: its directory's)",
    )
    serve.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    serve.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    serve.add_argument(
        "--kv-cache-dtype",
        dest="kv_cache_dtype",
        default="float32",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="how cached keys/values are stored (auto: float32 on the CPU, bfloat16 on CUDA)",
    )
    serve.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N (a build with the CUDA backend and a GPU)",
    )
    serve.add_argument(
        "--drain-timeout",
        dest="drain_timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may finish after SIGTERM",
    )


def _serve(args: argparse.Namespace) -> int:
    from lorart import serve

    _check_int_flags(
        args,
        port=(0, 65535),
        max_batch_size=(1, INT32_MAX),
        max_queue=(1, INT32_MAX),
        max_lora_rank=(1, INT32_MAX),
    )
    config = {"max_batch_size": args.max_batch_size, "max_lora_rank": args.max_lora_rank}
    if args.max_num_tokens is not None:
        config["max_num_tokens"] = args.max_num_tokens
    if args.max_seq_len is not None:
        config["max_seq_len"] = args.max_seq_len
    if args.kv_cache_dtype != "float32":
        from lorart._core import KvCacheConfig

        config["kv_cache"] = KvCacheConfig(dtype=args.kv_cache_dtype)
    try:
        _start_server(serve, args, config)
    except Interrupted as err:
        # uvicorn has drained the in-flight requests (up to --drain-timeout) and handed the
        # signal on: SIGTERM is how a server is told to stop, so that is a clean exit.
        if err.signum != signal.SIGTERM:
            raise
        logger.info("stopped by SIGTERM")
    return 0


def _start_server(serve, args: argparse.Namespace, config: dict) -> None:
    serve.serve(
        host=args.host,
        port=args.port,
        drain_timeout=args.drain_timeout,
        model_dir=args.model_dir,
        tokenizer_dir=args.tokenizer_dir,
        lora_modules=serve.parse_lora_modules(args.lora_modules),
        lora_root=args.lora_root,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_queue=args.max_queue,
        device=args.device,
        num_threads=args.threads,
        dtype=args.dtype,
        precision=args.precision,
        **config,
    )


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads of the forward (default: the CPUs available to this process)",
    )


# run.py --run_profiling times this many repeats of the batch.
PROFILING_ITERATIONS = 10


def _run(args: argparse.Namespace) -> int:
    from lorart._core import KvCacheConfig
    from lorart.llm import LLM, load_tokenizer

    _check_run_flags(args)
    model_dir, model_flag = _model_dir(args)
    model_config = _check_model_dir(model_dir, model_flag)
    tokenizer_dir, tokenizer_flag = (
        (args.tokenizer_dir, "--tokenizer_dir") if args.tokenizer_dir else (model_dir, model_flag)
    )
    tokenizer_file = _tokenizer_file(tokenizer_dir, tokenizer_flag)
    for lora_dir in args.lora_dir:
        _check_lora_dir(lora_dir)
    if args.input_file:
        _check_input_file(args.input_file)

    tokenizer = _flagged(tokenizer_flag, tokenizer_dir, load_tokenizer, tokenizer_file)
    prompts = _read_prompts(args, tokenizer, tokenizer_file, model_config)
    adapters = _adapters_per_prompt(args, len(prompts))
    # Base prompts fail here, before anything loads; an adapter's vocabulary (its own
    # embed_tokens may be bigger) is known once it is converted, and LLM checks those prompts.
    _check_token_ids(prompts, adapters, model_config.vocab_size, _prompt_source(args))
    longest = max(len(p) for p in prompts)
    max_seq_len = longest + args.max_output_len
    if max_seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"the longest input ({longest} tokens) + --max_output_len {args.max_output_len} = "
            f"{max_seq_len} exceeds the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}"
        )
    batch = max(1, min(len(prompts), 64))
    kv_tokens = max(max_seq_len, min(KvCacheConfig().max_tokens, batch * max_seq_len))

    start = time.monotonic()
    with LLM(
        model_dir,
        tokenizer_file,
        adapter_tokenizers=False,  # run.py: --tokenizer_dir tokenizes every input
        device=args.device,
        num_threads=args.threads,
        lora_dirs=args.lora_dir,
        dtype=args.dtype,
        precision=args.precision,
        max_batch_size=batch,
        max_seq_len=max_seq_len,
        kv_cache=KvCacheConfig(max_tokens=kv_tokens, dtype=args.kv_cache_dtype),
    ) as llm:
        load_seconds = time.monotonic() - start
        logger.info(
            "generating %d input(s), up to %d tokens each", len(prompts), args.max_output_len
        )
        sampling = dict(
            lora=adapters,
            max_new_tokens=args.max_output_len,
            top_k=max(args.top_k, 0),
            top_p=args.top_p if args.top_p > 0 else 1.0,
            temperature=args.temperature,
            seed=args.random_seed,
        )
        start = time.monotonic()
        if args.streaming:
            outputs = print_streaming(llm, prompts, sampling)
        else:
            outputs = llm.generate(prompts, **sampling)
            print_table(llm, outputs)
        logger.info("%s", timing_line(load_seconds, time.monotonic() - start, outputs))
        if args.run_profiling:
            start = time.monotonic()
            for _ in range(PROFILING_ITERATIONS):
                llm.generate(prompts, **sampling)
            latency = (time.monotonic() - start) / PROFILING_ITERATIONS
            print(
                f"batch_size: {len(prompts)}, avg latency of {PROFILING_ITERATIONS} "
                f"iterations: {latency:.4f} sec"
            )
    return 0


def _check_run_flags(args: argparse.Namespace) -> None:
    if args.num_beams != 1:
        raise ValueError(
            f"--num_beams {args.num_beams}: beam search is not supported; lorart decodes one "
            "beam per input (--num_beams 1)"
        )
    if args.lora_ckpt_source == "nemo":
        raise ValueError(
            "--lora_ckpt_source nemo: NeMo LoRA checkpoints are not supported; pass PEFT "
            "adapter directories (hf), or .npy pairs from lorart convert"
        )
    if (args.input_text is None) == (args.input_file is None):
        raise ValueError("give the prompts with either --input_text or --input_file")
    for flag in ("max_output_len", "max_input_length"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    # Numbers the C++ structs hold in fixed-width ints: out of range they would fail deep inside
    # the bindings (a TypeError) after the checkpoint loaded, so check them here.
    _check_int_flags(
        args,
        max_output_len=(1, INT32_MAX),
        max_input_length=(1, INT32_MAX),
        top_k=(-INT32_MAX, INT32_MAX),
        random_seed=(0, 2**64 - 1),
    )
    from lorart._core import SamplingConfig

    try:
        SamplingConfig(
            top_k=max(args.top_k, 0),
            top_p=args.top_p if args.top_p > 0 else 1.0,
            temperature=args.temperature,
            seed=args.random_seed,
        )
    except ValueError as err:
        raise ValueError(f"--top_k/--top_p/--temperature: {err}") from None


INT32_MAX = 2**31 - 1


def _check_int_flags(args: argparse.Namespace, **ranges: tuple[int, int]) -> None:
    """Each ``--flag`` given in ``ranges`` (and ``--threads``) within its inclusive range."""
    ranges.setdefault("threads", (0, 1024))
    for flag, (lo, hi) in ranges.items():
        value = getattr(args, flag, None)
        if value is not None and not lo <= value <= hi:
            raise ValueError(f"--{flag} {value} is out of range [{lo}, {hi}]")


def _model_dir(args: argparse.Namespace) -> tuple[str, str]:
    """The checkpoint directory and the flag that named it."""
    given = [
        (getattr(args, flag), f"--{flag}")
        for flag in ("model_dir", "hf_model_dir", "engine_dir")
        if getattr(args, flag)
    ]
    if not given:
        raise ValueError("--model_dir is required (the HF checkpoint directory)")
    if args.engine_dir and len(given) > 1:
        logger.warning(
            "--engine_dir %s is ignored: lorart runs the HF checkpoint %s",
            args.engine_dir,
            given[0][0],
        )
    return given[0]


def _check_dir(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: no such directory")
    if not p.is_dir():
        raise NotADirectoryError(f"{flag} {path}: not a directory")
    return p


def _flagged(flag: str, path: str | Path, fn: Callable[..., Any], *fn_args: object) -> Any:
    """``fn(*fn_args)``, with a user error's message prefixed by the flag and path it came from."""
    try:
        return fn(*fn_args)
    except USER_ERRORS as err:
        message = str(err)
        if str(path) not in message:
            message = f"{path}: {message}"
        raise ValueError(f"{flag} {message}") from None


def _check_model_dir(model_dir: str, flag: str) -> ModelConfig:
    p = _check_dir(model_dir, flag)
    if not (p / "config.json").is_file():
        engines = sorted(p.glob("*.engine"))
        if engines:
            raise FileNotFoundError(
                f"{flag} {model_dir}: holds a TensorRT engine ({engines[0].name}); lorart runs "
                "HF checkpoints: pass the Hugging Face model directory"
            )
        raise FileNotFoundError(
            f"{flag} {model_dir}: no config.json (expected an HF checkpoint directory: "
            "config.json + model.safetensors)"
        )
    config = _flagged(flag, model_dir, hf.load_config, p)
    _flagged(flag, model_dir, hf.checkpoint_files, p)
    return config


def _tokenizer_file(tokenizer_dir: str, flag: str) -> Path:
    p = Path(tokenizer_dir)
    if p.is_file():
        return p
    _check_dir(tokenizer_dir, flag)
    if not (p / "tokenizer.json").is_file():
        hint = "" if flag == "--tokenizer_dir" else "; pass --tokenizer_dir"
        raise FileNotFoundError(f"{flag} {tokenizer_dir}: no tokenizer.json{hint}")
    return p / "tokenizer.json"


def _check_lora_dir(lora_dir: str) -> None:
    p = _check_dir(lora_dir, "--lora_dir")
    if not lora.is_npy_dir(p) and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"--lora_dir {lora_dir}: neither a PEFT adapter (adapter_config.json) nor a "
            f"converted pair ({lora.WEIGHTS_FILE} + {lora.CONFIG_FILE})"
        )


_INPUT_SUFFIXES = (".txt", ".csv", ".npy")


def _check_input_file(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--input_file {path}: no such file")
    if p.suffix.lower() not in _INPUT_SUFFIXES:
        raise ValueError(
            f"--input_file {path}: unsupported format {p.suffix or '(no extension)'!r}; use .txt "
            "(one prompt per line), .csv (token ids, one prompt per line) or .npy (token ids)"
        )


def _read_prompts(
    args: argparse.Namespace, tokenizer: Tokenizer, tokenizer_file: Path, model_config: ModelConfig
) -> list[list[int]]:
    """Token ids of every prompt, each cut to its last ``--max_input_length`` tokens."""
    from lorart import prompts

    limit = args.max_input_length
    if args.input_file:
        path = args.input_file
        suffix = Path(path).suffix.lower()
        if suffix == ".txt":
            texts = _flagged("--input_file", path, prompts.read_text_lines, path)
        else:
            if suffix == ".csv":
                ids = _flagged("--input_file", path, prompts.read_csv_ids, path)
            else:
                pad_id = prompts.pad_token_id(tokenizer, tokenizer_file, model_config)
                ids = _flagged("--input_file", path, prompts.read_npy_ids, path, pad_id)
            return prompts.keep_last(ids, limit)
    else:
        texts = args.input_text
    return prompts.tokenize(tokenizer, texts, limit, not args.no_add_special_tokens)


def _prompt_source(args: argparse.Namespace) -> str:
    return f"--input_file {args.input_file}" if args.input_file else "--input_text"


def _check_token_ids(
    prompts: list[list[int]], adapters: list[str | None], vocab: int, source: str
) -> None:
    """Negative ids in any prompt, and ids past the base vocabulary in base (-1) prompts."""
    for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        negative = next((t for t in ids if t < 0), None)
        if negative is not None:
            raise ValueError(f"{source}: prompt {i}: token id {negative} is negative")
        bad = next((t for t in ids if t >= vocab), None) if adapter is None else None
        if bad is not None:
            raise ValueError(
                f"{source}: prompt {i}: token id {bad} is outside the base model's vocabulary "
                f"[0, {vocab}) (its --lora_task_uids is -1; only an adapter with its own "
                "vocabulary takes more)"
            )


def _adapters_per_prompt(args: argparse.Namespace, count: int) -> list[str | None]:
    uids = args.lora_task_uids if args.lora_task_uids else ["-1"] * count
    if len(uids) != count:
        raise ValueError(f"--lora_task_uids has {len(uids)} values for {count} inputs")
    adapters = []
    for uid in uids:
        try:
            index = int(uid)
        except ValueError:
            raise ValueError(f"--lora_task_uids value {uid!r} is not an integer") from None
        if index < -1 or index >= len(args.lora_dir):
            raise ValueError(
                f"--lora_task_uids value {uid} names no --lora_dir "
                f"({len(args.lora_dir)} given; -1 = base model)"
            )
        adapters.append(None if index == -1 else args.lora_dir[index])
    return adapters


def print_table(llm: LLM, outputs: Sequence[GenerationOutput]) -> None:
    """Print run.py's lines: the input as the model saw it, then each output."""
    for i, out in enumerate(outputs):
        shown = llm.decode(out.prompt_token_ids, skip_special_tokens=False, lora=out.lora)
        print(f'Input [Text {i}]: "{shown}"')
        print(f'Output [Text {i} Beam 0]: "{out.text}"')
        print()


def print_streaming(
    llm: LLM, prompts: list[list[int]], sampling: dict[str, Any]
) -> list[GenerationOutput]:
    """run.py's lines, each output printed as its tokens arrive. Outputs appear in input order:
    the text of a later input is held until the ones before it finish."""
    from lorart.llm import GenerationOutput, TextStream

    adapters = sampling["lora"]
    streams = [TextStream(llm, a) for a in adapters]
    outputs = [
        GenerationOutput("", s.token_ids, "", list(p), lora=a)
        for s, p, a in zip(streams, prompts, adapters, strict=True)
    ]
    printed: list[str | None] = [None] * len(prompts)  # None until the input's lines start
    current = 0
    start = time.monotonic()
    try:
        for i, tokens, response in llm.generate_iter(prompts, **sampling):
            if tokens and outputs[i].first_token_seconds is None:
                outputs[i].first_token_seconds = time.monotonic() - start
            streams[i].add(tokens)
            if response.is_final:
                outputs[i].finish_reason = response.finish_reason
                outputs[i].text = llm.decode(outputs[i].token_ids, lora=outputs[i].lora)
            while current < len(prompts):
                out = outputs[current]
                if printed[current] is None:
                    decoded = llm.decode(
                        out.prompt_token_ids, skip_special_tokens=False, lora=out.lora
                    )
                    print(f'Input [Text {current}]: "{decoded}"')
                    print(f'Output [Text {current} Beam 0]: "', end="")
                    printed[current] = ""
                text = out.text if out.finish_reason else streams[current].text
                print(text[len(printed[current]) :], end="", flush=True)
                printed[current] = text
                if not out.finish_reason:
                    break
                print('"\n')
                current += 1
    except BaseException:
        if current < len(prompts) and printed[current] is not None:
            print()  # end the half-printed line before the error or interrupt message
        raise
    return outputs


def timing_line(
    load_seconds: float, generate_seconds: float, outputs: Sequence[GenerationOutput]
) -> str:
    """Load, prefill and decode times with token rates. Prefill runs until every input has its
    first token. Decode (every token after an input's first) runs from the earliest first token
    to the end: inputs admitted late still prefill while others decode, and a window starting at
    the last first token would credit it with tokens made before it (a rate many times too high).
    """
    firsts = [o.first_token_seconds for o in outputs if o.first_token_seconds is not None]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    prefill = max(firsts) if firsts else generate_seconds
    decode = max(generate_seconds - min(firsts), 0.0) if firsts else 0.0
    decoded = sum(max(len(o.token_ids) - 1, 0) for o in outputs)

    def rate(tokens: int, seconds: float) -> str:
        return f"{tokens / seconds:,.1f} tok/s" if seconds > 0 else "- tok/s"

    return (
        f"timing: load {load_seconds:.2f} s | prefill {prompt_tokens} tokens in {prefill:.3f} s "
        f"({rate(prompt_tokens, prefill)}) | decode {decoded} tokens in {decode:.3f} s "
        f"({rate(decoded, decode)}) | {len(outputs)} inputs"
    )


# ---------------------------------------------------------------------------------------------
# lorart demo


def _demo(args: argparse.Namespace) -> int:
    from lorart import demo

    if args.max_output_len < 1:
        raise ValueError(f"--max_output_len must be at least 1, got {args.max_output_len}")
    _check_int_flags(args, max_output_len=(1, INT32_MAX))
    return demo.run(max_output_len=args.max_output_len, num_threads=args.threads)


if __name__ == "__main__":
    raise SystemExit(main())
