"""What the HTTP layer costs: the same streams over gRPC `Generate` and over
the OpenAI API (`/v1/completions`, `stream=True`, the official `openai` SDK),
at 1, 4 and 16 concurrent clients, against one `keras-llm serve` process.

    python -m benchmarks.http_vs_grpc --model_base_path DIR --model_name NAME \\
        [--concurrency 1 4 16] [--new-tokens 128] [--rounds 3]

The server runs in its own process; each round runs gRPC then HTTP at each
concurrency, so machine noise hits both alike. Figures are medians over
rounds: requests/s, generated tokens/s, time to first token. Prints JSON.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import time

from benchmarks import bench_serving
from benchmarks.common import prompt_ids


def _grpc_stream(target, ids, new_tokens):
    from keras_llm.serving.client import Client  # pylint: disable=import-outside-toplevel

    with Client(target, timeout=900) as client:
        start, first, count = time.perf_counter(), None, 0
        for response in client.stream_responses(ids, max_new_tokens=new_tokens,
                                                ignore_eos=True):
            if response.HasField("delta") and response.delta.token_ids and first is None:
                first = time.perf_counter() - start
            if response.HasField("summary"):
                count = response.summary.generated_tokens
        return count, first


def _http_stream(base_url, model, ids, new_tokens):
    import openai  # pylint: disable=import-outside-toplevel

    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                       timeout=900) as client:
        start, first, usage = time.perf_counter(), None, None
        for chunk in client.completions.create(
                model=model, prompt=ids, max_tokens=new_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return usage, first


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_base_path", required=True)
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from keras_llm.runtime.tokenizer import HostTokenizer  # pylint: disable=import-outside-toplevel

    base = os.path.join(args.model_base_path, args.model_name)
    version = max(int(v) for v in os.listdir(base) if v.isdigit())
    tokenizer = HostTokenizer.load(os.path.join(base, str(version), "assets"))
    port, rest = bench_serving.free_port(), bench_serving.free_port()
    most = max(args.concurrency)
    proc = bench_serving.start_server(args.model_base_path, args.model_name, port, most, 1024,
                                      extra_args=("--rest_api_port", str(rest)))
    target, base_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{rest}/v1"
    prompts = [prompt_ids(tokenizer, args.prompt_tokens, offset=5 * i) for i in range(most)]
    calls = {"grpc": lambda ids: _grpc_stream(target, ids, args.new_tokens),
             "http": lambda ids: _http_stream(base_url, args.model_name, ids, args.new_tokens)}
    runs = {(kind, c): [] for kind in calls for c in args.concurrency}
    try:
        for call in calls.values():
            call(prompts[0])  # warm both paths
        for _ in range(args.rounds):
            for clients in args.concurrency:
                for kind, call in calls.items():
                    begin = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                        out = list(pool.map(call, prompts[:clients]))
                    wall = time.perf_counter() - begin
                    runs[(kind, clients)].append({
                        "requests_per_s": clients / wall,
                        "tokens_per_s": sum(n for n, _ in out) / wall,
                        "ttft_s": statistics.median(t for _, t in out)})
    finally:
        bench_serving.stop_server(proc)
    result = {"new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
              "rounds": args.rounds, "rows": []}
    for clients in args.concurrency:
        row = {"clients": clients}
        for kind in calls:
            for key in ("requests_per_s", "tokens_per_s", "ttft_s"):
                row[f"{kind}_{key}"] = statistics.median(r[key] for r in runs[(kind, clients)])
        row["http_over_grpc_tokens"] = row["http_tokens_per_s"] / row["grpc_tokens_per_s"]
        result["rows"].append(row)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
