#!/usr/bin/env python3
"""A client of ``lorart serve`` that does what TensorRT-LLM's
``inflight_batcher_llm/client/inflight_batcher_llm_client.py`` does in the seed tutorial: tokenize
one prompt, send it (with an optional LoRA adapter), print the input and output sequences. Run
several at once and the server batches them, each with its own adapter, in one forward.

An adapter is named by its path under the server's ``--lora-root``: the client makes it known
with ``POST /v1/load_lora_adapter`` (its name is the path) and then names it in ``model``.

    lorart serve --lora-root python/lorart/assets/demo &
    python examples/multi_lora_client.py --text "美国的首都在哪里? \\n答案:" --lora-path lora_zh \\
        --tokenizer-dir python/lorart/assets/demo/model

Needs only the standard library and ``tokenizers`` (for ``--tokenizer-dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any


def call(url: str, path: str, body: dict | None, api_key: str | None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def base_model(url: str, api_key: str | None) -> str:
    status, models = call(url, "/v1/models", None, api_key)
    if status != 200:
        raise SystemExit(f"GET /v1/models: {status} {models}")
    return next(m["id"] for m in models["data"] if m.get("parent") is None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="the prompt")
    parser.add_argument("--request-output-len", type=int, default=16, help="tokens to generate")
    parser.add_argument("--top-k", type=int, default=0, help="0: the whole vocabulary")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tokenizer-dir", required=True, help="directory of tokenizer.json")
    parser.add_argument(
        "--lora-path", default="", help="adapter directory under the server's --lora-root"
    )
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{args.tokenizer_dir}/tokenizer.json")
    input_ids = tokenizer.encode(args.text).ids
    print("Input sequence: ", input_ids, flush=True)

    model = base_model(args.url, args.api_key)
    if args.lora_path:
        model = args.lora_path
        status, body = call(
            args.url,
            "/v1/load_lora_adapter",
            {"lora_name": model, "lora_path": args.lora_path},
            args.api_key,
        )
        # Another client may have loaded it a moment ago: that is as good.
        if status != 200 and "already loaded" not in body.get("error", {}).get("message", ""):
            print(f"loading {args.lora_path}: {status} {body}", file=sys.stderr)
            return 1
    status, body = call(
        args.url,
        "/v1/completions",
        {
            "model": model,
            "prompt": input_ids,
            "max_tokens": args.request_output_len,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "temperature": args.temperature,
            "seed": args.seed,
            "return_token_ids": True,
        },
        args.api_key,
    )
    if status != 200:
        print(f"POST /v1/completions: {status} {body}", file=sys.stderr)
        return 1
    [choice] = body["choices"]
    print("Got completed request", flush=True)
    print(f"Input: {args.text}")
    print(f"Output beam 0: {choice['text']}")
    print("Output sequence: ", input_ids + choice["token_ids"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
