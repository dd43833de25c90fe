"""llama.cpp's figures on a GGUF, measured the way `benches/engine.rs` measures lifeboat's.

Run by scripts/bench-llamacpp (which provides a venv with llama-cpp-python built from
source for this CPU). Prints one JSON line with the same keys as lifeboat's engine bench:
time to ready (load + one warm-up token), prefill of the same ~512-token prompt,
single-stream greedy decode, TTFT and aggregate decode at several concurrent streams, and
peak RSS. llama-cpp-python serves one sequence at a time, as a one-slot server would: the
concurrent streams are queued behind each other.
"""

import argparse
import json
import resource
import time

import numpy as np
from llama_cpp import Llama

# The same text lifeboat's bench repeats (src/engine/bench/mod.rs).
TEXT = (
    "The gateway answered slowly, so the local model took over. "
    "fn add(a: i32, b: i32) -> i32 { a + b } Numbers: 12 345 6789. "
    "Every request was counted, every token was billed, and nothing was lost. "
)


def prompt_tokens(llm, tokens):
    text = ""
    ids = []
    while len(ids) < tokens:
        text += TEXT
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    text = llm.detokenize(ids[:tokens]).decode("utf-8", errors="replace")
    return llm.tokenize(text.encode(), add_bos=False, special=False)


def generate(llm, prompt, max_tokens, start):
    """Greedy generation from scratch; returns (first token time, end time, tokens)."""
    llm.reset()
    llm.eval(prompt)
    first = None
    produced = 0
    eos = llm.token_eos()
    while produced < max_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        produced += 1
        if first is None:
            first = time.perf_counter() - start
        if token == eos:
            break
        if produced < max_tokens:
            llm.eval([token])
    return first, time.perf_counter() - start, produced


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--stream-prompt-tokens", type=int, default=64)
    parser.add_argument("--stream-tokens", type=int, default=32)
    args = parser.parse_args()

    start = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=2048,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    llm.eval([llm.token_bos()])  # warm-up, as lifeboat does before /ready turns 200
    ready = time.perf_counter() - start

    long_prompt = prompt_tokens(llm, args.prompt_tokens)
    short_prompt = prompt_tokens(llm, args.stream_prompt_tokens)

    llm.reset()
    t = time.perf_counter()
    llm.eval(long_prompt)
    int(np.argmax(llm.scores[llm.n_tokens - 1]))
    prefill = time.perf_counter() - t

    t = time.perf_counter()
    first, end, decoded = generate(llm, short_prompt, args.decode_tokens, t)
    decode_tps = (decoded - 1) / (end - first) if decoded > 1 and end > first else 0.0

    streams = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        group = time.perf_counter()
        ttfts, tokens = [], 0
        for _ in range(concurrency):
            first, _, produced = generate(llm, short_prompt, args.stream_tokens, group)
            ttfts.append(first * 1000)
            tokens += produced
        wall = time.perf_counter() - group
        streams.append({
            "concurrency": concurrency,
            "ttft_median_ms": float(np.median(ttfts)),
            "ttft_max_ms": max(ttfts),
            "aggregate_tokens_per_second": tokens / wall,
        })

    print(json.dumps({
        "model": args.model,
        "ready_seconds": ready,
        "prefill_prompt_tokens": len(long_prompt),
        "prefill_seconds": prefill,
        "prefill_tokens_per_second": len(long_prompt) / prefill,
        "decode_tokens": decoded,
        "decode_tokens_per_second": decode_tps,
        "streams": streams,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
