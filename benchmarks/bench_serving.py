"""Throughput and time to first token through the gRPC server.

Starts `keras-llm serve` as its own process on loopback with an export, waits
for health SERVING, then measures aggregate decode tokens/s with 1, 4 and 16
concurrent streams (and the same streams one after another, as a ratio) and
the time to first token of a 128-token prompt at concurrency 1.

    python -m benchmarks.bench_serving --model_base_path DIR --model_name NAME
"""

import argparse
import concurrent.futures
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.common import write_report, machine, prompt_ids, summarize
from keras_llm.serving.client import Client


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base, name, port, max_slots, max_length, extra_args=()):
    """`keras-llm serve` on `base/name` as its own process; returns it once SERVING."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_llm.cli", "serve", "--port", str(port), "--model_name",
         name, "--model_base_path", os.path.join(base, name), "--max_slots", str(max_slots),
         "--max_length", str(max_length), *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        stop_server(proc)
        raise RuntimeError("server did not become SERVING in 600 s")
    finally:
        channel.close()


def stop_server(proc, timeout=120):
    """SIGTERM (drain), then SIGKILL if it does not end in `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclasses.dataclass
class Streams:
    """Concurrent streams, per stream: tokens generated, their ids, and the
    seconds from the start of that stream to its first and last token."""

    tokens: list
    token_ids: list
    first_token_s: list
    last_token_s: list
    seconds: float  # wall time of all streams together


def run_streams(target, prompts, new_tokens):
    """Stream greedy generations for all `prompts` at once; returns `Streams`."""

    def one(prompt):
        with Client(target) as client:
            start = time.perf_counter()
            first = last = summary = None
            for response in client.stream_responses(prompt, max_new_tokens=new_tokens,
                                                    ignore_eos=True):
                now = time.perf_counter() - start
                if response.HasField("summary"):
                    summary = response.summary
                elif response.delta.token_ids:
                    first = now if first is None else first
                    last = now
        if summary is None:
            raise RuntimeError("stream ended without a summary")
        return summary.generated_tokens, list(summary.token_ids), first, last

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - start
    return Streams(*(list(column) for column in zip(*results)), seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_base_path", required=True)
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ttft-prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from keras_llm.tokenizer import BytePairTokenizer  # pylint: disable=import-outside-toplevel

    versions = sorted(int(v) for v in os.listdir(os.path.join(args.model_base_path, args.model_name))
                      if v.isdigit())
    tokenizer = BytePairTokenizer.load_assets(os.path.join(
        args.model_base_path, args.model_name, str(versions[-1]), "assets"))
    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = start_server(args.model_base_path, args.model_name, port, max(levels), 512)
    report = {"machine": machine(), "settings": vars(args), "throughput": {}}
    try:
        for level in levels:
            prompts = [prompt_ids(tokenizer, args.prompt_tokens, offset=5 * i) for i in range(level)]
            run_streams(target, prompts, 8)  # warm the shapes
            rates, ttfts = [], []
            for _ in range(args.repeats):
                streams = run_streams(target, prompts, args.new_tokens)
                rates.append(sum(streams.tokens) / streams.seconds)
                ttfts.extend(streams.first_token_s)
            report["throughput"][level] = {"tokens_per_s": summarize(rates),
                                           "time_to_first_token_s": summarize(ttfts)}
        long_prompt = [prompt_ids(tokenizer, args.ttft_prompt_tokens)]
        run_streams(target, long_prompt, 2)
        firsts = [run_streams(target, long_prompt, 2).first_token_s[0] for _ in range(5)]
        report["ttft_128_prompt_s"] = summarize(firsts)
        sequential_rate = None
        if 16 in levels:
            prompts = [prompt_ids(tokenizer, args.prompt_tokens, offset=5 * i) for i in range(16)]
            runs = [run_streams(target, [p], args.new_tokens) for p in prompts]
            sequential_rate = sum(r.tokens[0] for r in runs) / sum(r.seconds for r in runs)
            report["sequential_16_tokens_per_s"] = sequential_rate
    finally:
        stop_server(server)
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; TF {m['tensorflow']}; "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, through gRPC")
    print("| concurrent streams | aggregate tokens/s | time to first token (median) |")
    print("|---|---|---|")
    for level, row in report["throughput"].items():
        r, t = row["tokens_per_s"], row["time_to_first_token_s"]
        print(f"| {level} | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | "
              f"{t['median'] * 1000:.0f} ms |")
    t = report["ttft_128_prompt_s"]
    print(f"time to first token, {args.ttft_prompt_tokens}-token prompt, concurrency 1: "
          f"{t['median'] * 1000:.0f} ms (min {t['min'] * 1000:.0f}, max {t['max'] * 1000:.0f})")
    if sequential_rate:
        concurrent_rate = report["throughput"][16]["tokens_per_s"]["median"]
        print(f"16 streams concurrently vs one after another: {concurrent_rate:.1f} vs "
              f"{sequential_rate:.1f} tokens/s ({concurrent_rate / sequential_rate:.1f}x)")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
