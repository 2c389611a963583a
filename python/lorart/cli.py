"""The ``lorart`` command line.

Flags mirror TensorRT-LLM's scripts so its users feel at home: ``lorart convert`` is
``hf_lora_convert.py`` (``-i ADAPTER_DIR -o OUT_DIR --storage-type float16``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lorart import hf, lora


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorart", description="multi-LoRA inference runtime")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert",
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
        help="generate text with a base model and LoRA adapters (TensorRT-LLM run.py flags)",
        description="Generate for each --input_text; --lora_task_uids picks, per input, the "
        "index of a --lora_dir adapter or -1 for the base model. All inputs run as one "
        "mixed batch.",
    )
    _add_run_flags(run)
    run.set_defaults(run=_run)

    demo = commands.add_parser(
        "demo",
        help="the embedded multi-LoRA demo: base, Chinese and Japanese adapters in one batch",
        description="Runs the seed tutorial's table offline on the tiny model shipped with "
        "lorart: the same Chinese and Japanese question three times each, with task uids "
        "-1 0 1 -1 0 1, in one mixed batch.",
    )
    demo.add_argument("--max_output_len", type=int, default=12)
    _add_threads_flag(demo)
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:  # LoraError is a ValueError
        print(f"lorart {args.command}: error: {err}", file=sys.stderr)
        return 2


def _convert(args: argparse.Namespace) -> int:
    model_config = hf.load_config(args.model_dir) if args.model_dir else None
    weights, config = lora.from_peft(args.in_dir, model_config, dtype=args.storage_type)
    lora.save_npy(args.out_dir, weights, config)
    out = Path(args.out_dir)
    print(
        f"converted {args.in_dir}: {config.num_rows} rows, max_row {weights.shape[1]}, "
        f"{weights.dtype}"
    )
    print(f"wrote {out / lora.WEIGHTS_FILE} {[1, *weights.shape]}")
    print(f"wrote {out / lora.CONFIG_FILE} {[1, *config.shape]}")
    return 0


def _add_run_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--model_dir",
        "--engine_dir",
        dest="model_dir",
        required=True,
        help="HF checkpoint directory (config.json + safetensors)",
    )
    run.add_argument(
        "--tokenizer_dir",
        default=None,
        help="directory with tokenizer.json (default: the model dir)",
    )
    run.add_argument("--input_text", nargs="+", required=True, help="one or more prompts")
    run.add_argument(
        "--lora_dir", nargs="*", default=[], help="PEFT adapter or converted .npy directories"
    )
    run.add_argument(
        "--lora_task_uids",
        nargs="*",
        default=None,
        help="per input: index into --lora_dir, or -1 for the base model",
    )
    run.add_argument("--max_output_len", type=int, default=32)
    run.add_argument("--top_k", type=int, default=1, help="1 = greedy (default), 0 = no limit")
    run.add_argument("--top_p", type=float, default=0.0, help="0 = off (as in run.py)")
    run.add_argument("--temperature", type=float, default=1.0)
    run.add_argument("--random_seed", type=int, default=0)
    run.add_argument("--no_add_special_tokens", action="store_true")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument(
        "--use_py_session", action="store_true", help="accepted for run.py compatibility; no effect"
    )
    _add_threads_flag(run)


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads of the forward (default: the CPUs available to this process)",
    )


def _run(args: argparse.Namespace) -> int:
    from lorart.llm import LLM

    uids = args.lora_task_uids or ["-1"] * len(args.input_text)
    if len(uids) != len(args.input_text):
        raise ValueError(
            f"--lora_task_uids has {len(uids)} values for {len(args.input_text)} inputs"
        )
    adapters = []
    for uid in uids:
        index = int(uid)
        if index < -1 or index >= len(args.lora_dir):
            raise ValueError(
                f"--lora_task_uids value {uid} names no --lora_dir "
                f"({len(args.lora_dir)} given; -1 = base model)"
            )
        adapters.append(None if index == -1 else args.lora_dir[index])
    top_k = max(args.top_k, 0)
    top_p = args.top_p if args.top_p > 0 else 1.0
    with LLM(
        args.model_dir, args.tokenizer_dir, device=args.device, num_threads=args.threads
    ) as llm:
        outputs = llm.generate(
            args.input_text,
            lora=adapters,
            max_new_tokens=args.max_output_len,
            top_k=top_k,
            top_p=top_p,
            temperature=args.temperature,
            seed=args.random_seed,
            add_special_tokens=not args.no_add_special_tokens,
        )
        print_table(llm, args.input_text, outputs, not args.no_add_special_tokens)
    return 0


def print_table(llm, texts, outputs, add_special_tokens: bool) -> None:
    """Print run.py's lines: the input as the model saw it, then each output."""
    for i, (text, out) in enumerate(zip(texts, outputs, strict=True)):
        ids = llm.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        print(f'Input [Text {i}]: "{llm.decode(ids, skip_special_tokens=False)}"')
        print(f'Output [Text {i} Beam 0]: "{out.text}"')
        print()


def _demo(args: argparse.Namespace) -> int:
    from lorart import demo

    return demo.run(max_output_len=args.max_output_len, num_threads=args.threads)


if __name__ == "__main__":
    raise SystemExit(main())
