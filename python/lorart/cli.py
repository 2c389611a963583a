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

    demo = commands.add_parser(
        "demo", help="convert, validate and TP-split the embedded demo adapter (offline, CPU)"
    )
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


def _demo(args: argparse.Namespace) -> int:
    from lorart import demo

    return demo.run()


if __name__ == "__main__":
    raise SystemExit(main())
