"""OpenAI-compatible serving: the official `openai` client against a real uvicorn server on a loopback port.

One tiny Llama base and two LoRA adapters over it (random non-zero B, so each answers differently); one adapter sits in
a run dir whose config says `data.template: alpaca`, so the run's own template is what chat must use. References:
the real `tunelab generate` CLI, tunelab's prompt_ids / generate_ids in-process, the tokenizer's counts."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tiny import TINY_SHAPE, make_base_model, run_cli

PROMPTS = ["Reverse the word: apple", "What is 12 + 30?", "Sort the letters: dcba"]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter whose B is random (not PEFT's zeros), so it changes the base's answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def make_token_adapter(base: Path, out: Path, seed: int) -> Path:
    """An adapter whose run added two tokens: the base grows two rows, which the adapter trains (PEFT trainable
    tokens), as `data.template: auto` does when it adds ChatML's tokens to a tokenizer without them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.modeling.build import _token_layers

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<x1>", "<x2>"])
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = tokenizer.convert_tokens_to_ids(["<x1>", "<x2>"])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                             trainable_token_indices=_token_layers(model, new)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = make_base_model(root)
    a1 = make_adapter(base, root / "a1", seed=1)
    run = root / "runs" / "a2"  # a run dir: config.yaml beside final/, trained with the alpaca template
    make_adapter(base, run / "final", seed=2)
    (run / "config.yaml").write_text("data:\n  template: alpaca\n")
    return {"base": base, "a1": a1, "a2": run, "a3": make_token_adapter(base, root / "a3", seed=3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread of this process, so tests can read the engine's accounting."""

    def __init__(self, app):
        import uvicorn

        self.app, self.port = app, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


KEY = "serve-test-key"


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """`tunelab serve --model base=... --model a1=... --model a2=... --api-key KEY`'s app."""
    from tunelab.serve.app import create_app
    from tunelab.serve.settings import ServeSettings

    s = Server(create_app(ServeSettings(home=tmp_path_factory.mktemp("home"), models=models, api_key=KEY)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def local_reference(path: Path, messages: list[dict], template: str | None = None, max_new_tokens: int = 24):
    """(prompt ids, generated ids incl. the stop token) as `tunelab generate` computes them, in this process."""
    from tunelab.modeling.infer import Sampling, generate_ids, prompt_ids, run_template
    from tunelab.modeling.load import load_pretrained, resolve_model_dir

    model, tokenizer = load_pretrained(str(path))
    template = template or run_template(resolve_model_dir(str(path)))
    ids = prompt_ids(tokenizer, messages, template)
    return ids, generate_ids(model, tokenizer, ids, Sampling(max_new_tokens=max_new_tokens, template=template))


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          **{"temperature": 0, "max_tokens": 24, **kw})


def stream_text(stream, field="content") -> tuple[str, str]:
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            text += (getattr(choice.delta, field) or "") if field == "content" else choice.text
            finish = choice.finish_reason or finish
    return text, finish


def test_chat_equals_tunelab_generate(models, client):
    """Greedy chat through the API equals the real `tunelab generate` CLI on the same run, with the run's template;
    streamed text equals non-streamed; usage equals the tokenizer's counts."""
    cli = run_cli("generate", str(models["a2"]), *sum((["--prompt", p] for p in PROMPTS), []), "--max-new-tokens", "24")
    assert cli.returncode == 0, cli.stderr
    answers = []
    for prompt in PROMPTS:
        answer = chat(client, "a2", prompt)
        answers.append(answer.choices[0].message.content)
        streamed, finish = stream_text(chat(client, "a2", prompt, stream=True))
        assert streamed == answers[-1]
        assert finish == answer.choices[0].finish_reason
    assert cli.stdout == "".join(a.strip() + "\n" for a in answers)  # the CLI prints each reply stripped
    ids, new = local_reference(models["a2"], [{"role": "user", "content": PROMPTS[0]}])
    usage = chat(client, "a2", PROMPTS[0]).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), len(new),
                                                                                   len(ids) + len(new))
    from tunelab.modeling.infer import prompt_ids
    from tunelab.modeling.load import load_tokenizer

    chatml = prompt_ids(load_tokenizer(str(models["a2"] / "final")), [{"role": "user", "content": PROMPTS[0]}], "auto")
    assert len(ids) != len(chatml)  # the alpaca run template really differs from the tokenizer's own


def test_completions_and_stop_strings(models, client):
    """Completions feed the raw prompt (`tunelab generate --template none`); streamed == non-streamed; a stop string
    cuts the text before it with finish_reason stop; the same seed samples the same text."""
    from tunelab.modeling.load import load_pretrained

    prompt = "The answer is"
    ids, new = local_reference(models["base"], [{"role": "user", "content": prompt}], template="none")
    _, tokenizer = load_pretrained(str(models["base"]))
    out = client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=24)
    text = out.choices[0].text
    assert text == tokenizer.decode(new, skip_special_tokens=True)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(new))
    assert out.choices[0].finish_reason == ("length" if len(new) == 24 and new[-1] != tokenizer.eos_token_id
                                            else "stop")
    streamed, _ = stream_text(client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=24,
                                                        stream=True), field="text")
    assert streamed == text

    assert len(text) > 8, text
    stop = text[len(text) // 2:][:2]  # a string inside the greedy answer: the answer ends right before it
    cut = client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=24, stop=[stop, "§§"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    cut_streamed, finish = stream_text(client.completions.create(model="base", prompt=prompt, temperature=0,
                                                                 max_tokens=24, stop=stop, stream=True), field="text")
    assert (cut_streamed, finish) == (cut.choices[0].text, "stop")

    sampled = [chat(client, "a1", PROMPTS[1], temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    streamed, _ = stream_text(chat(client, "a1", PROMPTS[1], temperature=1.0, seed=7, stream=True))
    assert streamed == sampled[0]


def test_concurrent_requests_over_two_adapters(models, server, client):
    """20 concurrent chats over two adapters of one base: each answered by its own adapter (as when sent alone),
    requests batched, the base loaded once."""
    jobs = [("a1" if i % 2 else "a2", PROMPTS[i // 2 % 3] + "!" * (i // 2 % 4)) for i in range(20)]
    alone = {job: chat(client, *job).choices[0].message.content for job in set(jobs)}
    assert any(alone[("a1", p)] != alone[("a2", p)] for _, p in jobs if ("a1", p) in alone and ("a2", p) in alone)
    engine = server.app.state.engine
    batches_before = sum(n * c for n, c in engine.batch_sizes.items() if n > 1)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda job: chat(client, *job).choices[0].message.content, jobs))
    assert answers == [alone[job] for job in jobs]
    assert sum(n * c for n, c in engine.batch_sizes.items() if n > 1) > batches_before  # some ran batched
    base = models["base"].resolve()
    assert engine.loads[(base, None)] == 1
    assert sorted(a.name for b, a in engine.resident() if b == base and a) == ["a1", "final"]


def test_adapter_with_added_tokens_shares_the_base(models, server, client):
    """An adapter whose run added tokens grows the shared base (the adapters on it come off and back on): it answers
    as `tunelab generate` loads it alone, and the base and another adapter answer as before."""
    before = {name: chat(client, name, PROMPTS[0]).choices[0].message.content for name in ("base", "a1")}
    ids, new = local_reference(models["a3"], [{"role": "user", "content": PROMPTS[0]}])
    answer = chat(client, "a3", PROMPTS[0])
    assert answer.usage.completion_tokens == len(new)
    from tunelab.modeling.load import load_tokenizer

    tokenizer = load_tokenizer(str(models["a3"]))
    stop = set(tokenizer.convert_tokens_to_ids(["<|im_end|>"])) | {tokenizer.eos_token_id}
    assert answer.choices[0].message.content == tokenizer.decode([t for t in new if t not in stop],
                                                                 skip_special_tokens=True)
    assert {name: chat(client, name, PROMPTS[0]).choices[0].message.content for name in ("base", "a1")} == before
    assert server.app.state.engine.loads[(models["base"].resolve(), None)] == 1


def test_lru_one_resident_model(models, tmp_path):
    """--max-loaded 1: alternating two bases answers as each alone, with only one resident (each reloaded)."""
    from tunelab.modeling.scratch import save_tiny_model
    from tunelab.modeling.load import load_tokenizer
    from tunelab.serve.engine import Engine, Request, target_of

    torch.manual_seed(3)
    other = save_tiny_model(tmp_path / "other", load_tokenizer(str(models["base"])), TINY_SHAPE)
    engine = Engine(max_loaded=1)
    targets = {"base": target_of(models["base"]), "other": target_of(other)}

    async def ask(name):
        return (await engine.submit(targets[name], Request(prompt="The answer is", max_tokens=8,
                                                           temperature=0)).result()).text

    async def alternate():
        answers = []
        for name in ["base", "other"] * 2:
            answers.append((name, await ask(name)))
            assert [b for b, _ in engine.resident()] == [targets[name].base]
        return answers

    answers = asyncio.run(alternate())
    engine.close()
    assert answers[:2] == answers[2:] and answers[0][1] != answers[1][1]
    assert engine.loads[(targets["base"].base, None)] == engine.loads[(targets["other"].base, None)] == 2


def test_bad_requests_get_one_line_errors(server):
    import httpx

    good = {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    bad = [
        ({**good, "model": "nope"}, 404, "not found"),
        ({**good, "max_tokens": -1}, 400, "max_tokens"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "temperature": 3}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"),
        ({**good, "messages": []}, 400, "messages"),
        ({**good, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
        ({**good, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ({**good, "n": 2}, 400, "n=1"),
        ({**good, "logprobs": True}, 400, "logprobs"),
        ({**good, "stop": ["a", ""]}, 400, "stop"),
        ({**good, "stream": True, "max_tokens": -5}, 400, "max_tokens"),
        ({**good, "stream": True, "temperature": "hot"}, 400, "temperature"),
        ({**good, "max_tokens": 100_000}, 400, "context"),
        ({**good, "stream": True, "max_tokens": 100_000}, 400, "context"),
    ]
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for body, status, needle in bad:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == status, (body, r.text)
            message = r.json()["error"]["message"]
            assert needle in message and "\n" not in message, message
        r = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "base", "prompt": ["a", "b"]})
        assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
        r = http.get("/v1/models/endpoints/nope")
        assert r.status_code == 404
        r = http.post("/v1/chat/completions", json=good, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids == ["base", "a1", "a2", "a3"]
        assert http.post("/v1/chat/completions", json=good).status_code == 200  # still serving


def test_remote_generate_and_chat(models, server, capsys, monkeypatch):
    """`tunelab generate URL` prints what `tunelab generate RUN` prints; `tunelab chat URL` keeps the history on the
    client side and answers as the local chat does."""
    import io

    from tunelab.cli import main
    from tunelab.modeling.infer import Sampling, chat as local_chat, local_reply, run_template
    from tunelab.modeling.load import load_pretrained, resolve_model_dir

    url = f"{server.url}/a2"
    monkeypatch.setenv("TUNELAB_API_KEY", KEY)
    assert main(["generate", url, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "24"]) == 0
    remote = capsys.readouterr().out
    model, tokenizer = load_pretrained(str(models["a2"]))
    s = Sampling(max_new_tokens=24, template=run_template(resolve_model_dir(str(models["a2"]))))
    reply = local_reply(model, tokenizer, s)
    assert remote == "".join(reply([{"role": "user", "content": p}]) + "\n" for p in PROMPTS[:2])

    turns = "Reverse the word: apple\nAnd now: pear\n/exit\n"
    local_out = io.StringIO()
    local_chat(reply, system="Be brief.", stdin=io.StringIO(turns), stdout=local_out)
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    assert main(["chat", url, "--system", "Be brief.", "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == local_out.getvalue()

    for argv, error in [
        (["generate", f"{server.url}/endpoints/nope", "--prompt", "x"], "HTTP 404"),
        (["generate", url, "--prompt", "x", "--api-key", "wrong"], "HTTP 401: invalid API key"),
        (["generate", url, "--prompt", "x", "--max-new-tokens", "-3"], "HTTP 400: max_tokens"),
        (["generate", url, "--prompt", "x", "--template", "chatml"], "apply to local models"),
        (["generate", f"http://127.0.0.1:{free_port()}/a2", "--prompt", "x"], "cannot reach the server"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert error in err and err.count("\n") == 1, err
