"""Serving benchmark: `tunelab serve`'s OpenAI route against plain `transformers` generate, in the same run.

    python bench/serve.py                     # what `make bench-serve` runs: the tiny model, 16 concurrent requests
    python bench/serve.py --model 34m --requests 8 --max-tokens 32

Work: N chat requests (prompts from the benchmark's instruction rows, chatml), greedy, exactly `--max-tokens` new
tokens each (the model's weights are random, so it never ends a turn early: both sides do the same work).
- serve: `tunelab serve --model bench=DIR` in its own process; all N requests sent at once over HTTP with
  `stream: true` (httpx, one thread each); time to first token = until the first content chunk arrives.
- transformers: the same prompt ids (tunelab's prompt_ids) through `model.generate` one request at a time in this
  process, all N "arriving" at the start; time to first token = until that request's first token (a streamer).
Throughput = completion tokens of all N / wall time of all N. Both sides run greedy on the same weights, so their
texts must be equal; the script checks that. The server is started once and warmed up (model loaded); then the two
sides alternate `--reps` times and the table shows medians. Prints a table and writes bench/results/serve-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import assets  # noqa: E402


def prompts(n: int) -> list[str]:
    return [row["instruction"] for row in assets.rows(max(n, 8))[:n]]


# ---------------------------------------------------------------- plain transformers, one request at a time

class Plain:
    """The model loaded with plain transformers, warmed up by one generate call."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        from tunelab.data import stop_token_ids
        from tunelab.modeling.infer import prompt_ids
        from tunelab.modeling.load import load_tokenizer

        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.stops = stop_token_ids(assets.TEMPLATE, self.tokenizer)
        self.ids = lambda text: prompt_ids(self.tokenizer, [{"role": "user", "content": text}], assets.TEMPLATE)
        self.generate(self.ids("warm up"), 4)

    def generate(self, ids: list[int], max_tokens: int, streamer=None):
        import torch

        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                      top_k=None, eos_token_id=self.stops, pad_token_id=self.tokenizer.pad_token_id,
                                      streamer=streamer)
        return out[0, len(ids):].tolist()


def run_transformers(plain: Plain, texts: list[str], max_tokens: int) -> dict:
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call hands over the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    start, ttft, texts_out, tokens = time.perf_counter(), [], [], 0
    for text in texts:
        streamer = FirstToken()
        new = plain.generate(plain.ids(text), max_tokens, streamer)
        ttft.append(streamer.at - start)
        texts_out.append(plain.tokenizer.decode([t for t in new if t not in plain.stops], skip_special_tokens=True))
        tokens += len(new)
    return {"wall_s": time.perf_counter() - start, "ttft_s": ttft, "texts": texts_out, "tokens": tokens}


# ---------------------------------------------------------------- tunelab serve, all requests at once

def start_server(model_dir: Path, home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--home", str(home), "--port", str(port),
                             "--model", f"bench={model_dir}"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("tunelab serve did not start")


def run_server(url: str, texts: list[str], max_tokens: int) -> dict:
    import httpx

    results: list[dict | None] = [None] * len(texts)
    go = threading.Barrier(len(texts) + 1)

    def one(i: int) -> None:
        body = {"model": "bench", "messages": [{"role": "user", "content": texts[i]}], "temperature": 0,
                "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        text, first, tokens = "", None, 0
        with httpx.Client(timeout=600) as http:
            go.wait()
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = first or time.perf_counter()
                        text += chunk["choices"][0]["delta"]["content"]
        results[i] = {"text": text, "first": first, "tokens": tokens}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "ttft_s": [r["first"] - start for r in results], "texts": [r["text"] for r in results],
            "tokens": sum(r["tokens"] for r in results)}


# ---------------------------------------------------------------- the table

def summary(runs: list[dict]) -> dict:
    return {"tokens_per_s": statistics.median(r["tokens"] / r["wall_s"] for r in runs),
            "ttft_mean_s": statistics.median(statistics.mean(r["ttft_s"]) for r in runs),
            "ttft_max_s": statistics.median(max(r["ttft_s"]) for r in runs),
            "wall_s": statistics.median(r["wall_s"] for r in runs), "tokens": runs[0]["tokens"]}


def table(rows: dict, args) -> str:
    base = rows["transformers"]
    lines = [f"| {args.requests} concurrent chats x {args.max_tokens} tokens ({args.model} model) | completion tok/s | "
             "vs transformers | mean TTFT s | last TTFT s | wall s |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{r['ttft_mean_s']:.2f} | {r['ttft_max_s']:.2f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "34m"], default="tiny", help="bench/assets.py's 2-layer or 34M Llama")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    model_dir = assets.model_dir(tiny=args.model == "tiny")
    texts = prompts(args.requests)
    RESULTS.mkdir(exist_ok=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as home:
        proc, url = start_server(model_dir, Path(home))
        try:
            run_server(url, texts[:1], 4)  # loads the model
            plain = Plain(model_dir)
            runs = {"transformers": [], "tunelab serve": []}
            for rep in range(args.reps):
                runs["transformers"].append(run_transformers(plain, texts, args.max_tokens))
                runs["tunelab serve"].append(run_server(url, texts, args.max_tokens))
                same = runs["transformers"][-1]["texts"] == runs["tunelab serve"][-1]["texts"]
                print(f"rep {rep + 1}: texts equal: {same}", file=sys.stderr)
                if not same:
                    raise SystemExit("greedy texts differ between the server and transformers")
        finally:
            proc.terminate()
            proc.wait(30)
    rows = {name: summary(r) for name, r in runs.items()}
    import torch

    out = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "results": rows,
           "ratios": {"throughput": rows["tunelab serve"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"],
                      "ttft_mean": rows["tunelab serve"]["ttft_mean_s"] / rows["transformers"]["ttft_mean_s"]}}
    print(table(rows, args))
    print(json.dumps(out, indent=1))
    (RESULTS / "serve-cpu.json").write_text(json.dumps({**out, "markdown": table(rows, args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
