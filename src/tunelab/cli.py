"""Command line: each command parses its arguments and calls one function. No logic, no heavy imports here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tunelab.config import UserError


def _config(args):
    from tunelab.interop import load  # a tunelab, axolotl or LLaMA-Factory file

    return load(args.config, args.overrides, say=lambda line: print(line, file=sys.stderr))


def cmd_train(args) -> int:
    cfg = _config(args)  # checked here first, so a config mistake is reported once, before any process starts
    nproc = args.nproc
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        from tunelab.launch import launch

        return launch(nproc, getattr(args, "argv", None) or sys.argv[1:])
    from tunelab.trainer import train

    train(cfg, resume=args.resume)
    return 0


def cmd_convert(args) -> int:
    from tunelab.interop import convert_to_yaml

    print(convert_to_yaml(args.file), end="")
    return 0


def cmd_export(args) -> int:
    from tunelab.export import export

    export(args.model, args.format, args.quant, args.out)
    return 0


def cmd_push(args) -> int:
    from tunelab.hub import push

    push(args.run, args.repo_id, private=args.private)
    return 0


def cmd_validate(args) -> int:
    cfg = _config(args)
    missing = [s.path for s in cfg.data.train + cfg.data.eval if not Path(s.path).exists() and not any(c in s.path for c in "*?[")]
    if missing:
        raise UserError(f"data file not found: {missing[0]}")
    print(f"{args.config}: ok (method {cfg.method}, "
          f"{'adapter ' + cfg.adapter.type if cfg.adapter else 'full fine-tuning'}"
          f"{', ' + cfg.model.quantize if cfg.model.quantize else ''}, output_dir {cfg.output_dir})")
    return 0


def cmd_preprocess(args) -> int:
    cfg = _config(args)
    from tunelab.preprocess import preprocess

    print(preprocess(cfg, show=args.show, as_json=args.json))
    return 0


def cmd_modules(args) -> int:
    from tunelab.model import linear_module_names, load_pretrained

    from tunelab.moe import all_linear_targets, expert_parameters, leaf, router_modules

    model, _ = load_pretrained(args.model)
    names = linear_module_names(model)
    experts, routers = expert_parameters(model), router_modules(model)
    print("linear layers a LoRA adapter can target (adapter.target_modules):")
    for name in sorted(names):
        print(f"  {name}")
    if not experts:
        print("all-linear = all of the above (the output head is left out)")
        return 0
    print("expert weights (fused [experts, out, in] parameters; LoRA per expert, without dropout):")
    for name in sorted({leaf(n, 2) for n in experts}):
        print(f"  {name}")
    print("routers (frozen unless named, e.g. adapter.modules_to_save: [gate] trains them fully):")
    for name in sorted({leaf(n) for n in routers}):
        print(f"  {name}")
    modules, params = all_linear_targets(model, names)
    print(f"all-linear = {', '.join(modules + params)} (the output head and the routers are left out)")
    return 0


def cmd_merge(args) -> int:
    from tunelab.merging import merge

    out = merge(args.run, args.out, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0


def _inference(args):
    from tunelab.infer import Sampling, run_template
    from tunelab.model import load_pretrained, resolve_model_dir

    model, tokenizer = load_pretrained(args.model, dtype=args.dtype)
    template = args.template or run_template(resolve_model_dir(args.model))
    s = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, template=template)
    return model, tokenizer, s


def _reply(args):
    """How a turn is answered: by a local model, or by a `tunelab serve` endpoint when MODEL is its URL."""
    from tunelab.serve.remote import is_url, remote_reply

    if is_url(args.model):
        if args.template or args.dtype != "auto" or args.tools:
            raise UserError("--template, --dtype and --tools apply to local models; a server uses each run's own template")
        return remote_reply(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, api_key=args.api_key or os.environ.get("TUNELAB_API_KEY"))
    from tunelab.infer import local_reply

    tools = _load_tools(args.tools)  # before the model loads: a bad file fails fast
    return local_reply(*_inference(args), tools=tools)


def _load_tools(path: str | None) -> list | None:
    """--tools FILE: a JSON list of function schemas (OpenAI's {"type": "function", "function": {...}} or bare)."""
    import json

    from tunelab.data.tools import check_tools

    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"--tools {path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return check_tools(path, data)


def cmd_generate(args) -> int:
    reply = _reply(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    system = [{"role": "system", "content": args.system}] if args.system else []
    for prompt in prompts:
        print(reply(system + [{"role": "user", "content": prompt}]))
    return 0


def cmd_chat(args) -> int:
    from tunelab.infer import chat

    chat(_reply(args), system=args.system)
    return 0


def cmd_estimate(args) -> int:
    cfg = _config(args)
    from tunelab.estimate import estimate, format_estimate

    print(format_estimate(estimate(cfg, device=args.device, memory_gb=args.memory_gb)))
    return 0


def cmd_eval(args) -> int:
    cfg = _config(args)
    from tunelab.evaluation import run_eval

    run_eval(cfg, model_path=args.model, out=args.out)
    return 0


def cmd_serve(args) -> int:
    from tunelab.serve.settings import ServeSettings

    models = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model {item!r} is not of the form NAME=PATH")
        models[name] = path
    settings = ServeSettings(home=args.home, host=args.host, port=args.port, api_key=args.api_key,
                             max_jobs=args.max_jobs, data_roots=args.data_root, models=models,
                             max_loaded=args.max_loaded, allow_code=args.allow_code, max_retries=args.max_retries,
                             max_body_mb=args.max_body_mb, max_upload_mb=args.max_upload_mb,
                             allowed_hosts=args.allowed_host, allowed_origins=args.allowed_origin)
    from tunelab.serve.app import serve

    serve(settings)
    return 0


def cmd_jobs(args) -> int:
    from tunelab.jobs_cli import run

    return run(args)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run's YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run dir (uses its final/), an adapter dir, a model dir, or the URL of a model "
                   "served by `tunelab serve`: http://HOST:PORT/endpoints/NAME")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--template", default=None, help="override the chat template (default: the run's)")
    p.add_argument("--tools", default=None, help="a JSON file of function schemas the model may call (local models); "
                   "replies are printed as JSON {content, tool_calls}")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--api-key", default=None, help="a server URL's API key (default: $TUNELAB_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune language models from one YAML file.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train as the config says")
    _add_config(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (runs torchrun)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="print the tunelab YAML for an axolotl or LLaMA-Factory config")
    p.add_argument("file")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="a run's model as GGUF for llama.cpp, or GGUF + Modelfile for Ollama")
    p.add_argument("model", help="a run dir (uses final/; an adapter is merged first) or a model dir")
    p.add_argument("--format", default="gguf", choices=["gguf", "ollama", "gguf-lora"],
                   help="gguf-lora: a LoRA run's adapter alone, applied at load time on the base's GGUF")
    p.add_argument("--quant", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_k_m"])
    p.add_argument("--out", default=None, help="the export dir (default: RUN/export-FORMAT)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a run's final/ (or a merged / exported dir) to the Hugging Face Hub")
    p.add_argument("run", help="a run dir (uses final/), a merged model dir or an export dir")
    p.add_argument("repo_id", help="the Hub repo, e.g. me/my-model (created if new; token from HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("validate", help="check a config without loading anything heavy")
    _add_config(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preprocess", help="show tokens, which carry loss, and length statistics")
    _add_config(p)
    p.add_argument("--show", type=int, default=3, help="examples to print")
    p.add_argument("--json", action="store_true",
                   help="print each shown example as one JSON line: input_ids, labels (-100 = no loss) and text")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("modules", help="list the linear layers a LoRA adapter can target")
    p.add_argument("model", help="a model dir (or run dir)")
    p.set_defaults(func=cmd_modules)

    p = sub.add_parser("merge", help="fold a LoRA/QLoRA adapter into its base: a standalone model dir")
    p.add_argument("run", help="a run dir or adapter dir")
    p.add_argument("--out", required=True, help="where to write the merged model")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="complete prompts (from --prompt or stdin, one per line)")
    _add_sampling(p)
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("estimate", help="predict memory and time before loading any weights")
    _add_config(p)
    p.add_argument("--device", default=None, help="e.g. cpu, h100, a100-80gb, rtx4090")
    p.add_argument("--memory-gb", type=float, default=None, help="memory to fit in; suggests switches if it does not")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("eval", help="evaluate a model on the config's eval data; writes eval.json")
    _add_config(p)
    p.add_argument("--model", default=None, help="model/run dir to evaluate (default: the config's output_dir)")
    p.add_argument("--out", default=None, help="where to write eval.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="run the tuning service: jobs over HTTP, tuned-model endpoints, dashboard")
    p.add_argument("--host", default="127.0.0.1", help="other than loopback only with --api-key")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--home", default="tunelab-home", help="database, run dirs and uploads (default ./tunelab-home)")
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"), help="required on every request if set "
                   "(default $TUNELAB_API_KEY)")
    p.add_argument("--max-jobs", type=int, default=1, help="training processes at a time")
    p.add_argument("--data-root", action="append", default=[], help="a dir clients may name files in; repeatable")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="a base model served and "
                   "tunable by NAME; repeatable")
    p.add_argument("--max-loaded", type=int, default=4, help="models kept in memory for serving")
    p.add_argument("--allow-code", action="store_true", help="accept config keys that run code or unpickle "
                   "(module:function rewards/scorers, trust_remote_code, allow_pickle)")
    p.add_argument("--max-retries", type=int, default=0, help="restarts from the checkpoint of a job whose process "
                   "died on its own")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (uploads aside)")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest uploaded dataset")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME", help="a Host name answered "
                   "besides loopback and --host (others are refused against DNS rebinding); repeatable")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN", help="a site "
                   "(scheme://host[:port]) whose pages may POST/PUT/PATCH/DELETE besides the server's own; repeatable")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("jobs", help="talk to a tuning service: submit, list, status, cancel, logs")
    p.add_argument("--url", default=None, help="the service (default $TUNELAB_URL, else http://127.0.0.1:8321)")
    p.add_argument("--api-key", default=None, help="default $TUNELAB_API_KEY")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("submit", help="submit a tunelab config (or a managed request with source_model)")
    a.add_argument("file", help="YAML or JSON")
    a.add_argument("--display-name", default=None, help="the tuned model's endpoint name")
    a = actions.add_parser("list", help="jobs, newest first")
    a.add_argument("--state", default=None, help="e.g. RUNNING")
    a.add_argument("--limit", type=int, default=50)
    a = actions.add_parser("status", help="one job as JSON")
    a.add_argument("job")
    a.add_argument("--json", action="store_true", help="include the resolved config")
    a = actions.add_parser("cancel", help="stop a job (it checkpoints first)")
    a.add_argument("job")
    a = actions.add_parser("logs", help="the end of a job's log")
    a.add_argument("job")
    a.add_argument("--tail", type=int, default=200)
    p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # training-time conditions with their own message
        from tunelab.checkpoint import CheckpointWriteError
        from tunelab.trainer import Interrupted, TooManyBadSteps

        if isinstance(e, (Interrupted, TooManyBadSteps, CheckpointWriteError)):
            if os.environ.get("RANK", "0") == "0":  # every rank stops together with the same message: say it once
                print(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: {e}", file=sys.stderr)
            return 130 if isinstance(e, Interrupted) else 3
        raise


if __name__ == "__main__":
    sys.exit(main())
