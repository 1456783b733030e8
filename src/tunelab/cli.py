"""Command line: each command parses its arguments and calls one function. No logic, no heavy imports here."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from tunelab import run_files
from tunelab.config import UserError


def _config(args):
    from tunelab.interop import load  # a tunelab, axolotl or LLaMA-Factory file

    return load(args.config, args.overrides, say=lambda line: print(line, file=sys.stderr))


def cmd_train(args) -> int:
    cfg = _config(args)  # checked here first, so a config mistake is reported once, before any process starts
    from tunelab.launch import Nodes, launch

    nodes = Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port, args.rdzv_endpoint)
    nodes.check()
    nproc = args.nproc or 1
    if (nproc > 1 or nodes.count > 1) and "WORLD_SIZE" not in os.environ:  # not already a rank of a launcher
        return launch(nproc, getattr(args, "argv", None) or sys.argv[1:], nodes)
    from tunelab.training.loop import train

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
    from tunelab.modeling.load import linear_module_names, load_pretrained

    from tunelab.modeling.moe import all_linear_targets, expert_parameters, leaf, router_modules

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
    from tunelab.modeling.merging import merge

    out = merge(args.run, args.out, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0


def _inference(args):
    from tunelab.modeling.infer import Sampling, run_template
    from tunelab.modeling.load import load_pretrained, resolve_model_dir

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
    from tunelab.modeling.infer import local_reply

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
    from tunelab.modeling.infer import chat

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
                             allowed_hosts=args.allowed_host, allowed_origins=args.allowed_origin, backend=args.backend,
                             gpus=_gpu_list(args.gpus), cancel_grace=args.cancel_grace,
                             slurm_partition=args.slurm_partition, slurm_account=args.slurm_account,
                             slurm_extra=shlex.split(args.slurm_extra or ""), ray_address=args.ray_address)
    from tunelab.serve.app import serve

    serve(settings)
    return 0


def _gpu_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    ids = [g.strip() for g in text.split(",") if g.strip()]
    if text.strip() not in ("", "none") and (not ids or any(not g.isdigit() for g in ids) or len(set(ids)) < len(ids)):
        raise UserError(f"--gpus {text!r}: give distinct device numbers separated by commas (0,1,2,3), or none")
    return [] if text.strip() == "none" else ids


def cmd_jobs(args) -> int:
    from tunelab.client.jobs_cli import run

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
    p.add_argument("--nnodes", type=int, default=1, help="machines taking part, each running this command")
    p.add_argument("--node-rank", type=int, default=None, help="this machine's number, 0 to nnodes-1")
    p.add_argument("--master-addr", default=None, help="the address of node 0 (with --node-rank)")
    p.add_argument("--master-port", type=int, default=None, help="a free port on node 0 (default 29500)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT where the machines meet and are numbered "
                   "as they arrive (instead of --node-rank/--master-addr)")
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
    p.add_argument("--max-jobs", type=int, default=None, help="jobs running (or, on a cluster, queued there) at a "
                   "time (default 1; 1000 with --backend slurm or ray)")
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
    p.add_argument("--backend", default="local", choices=["local", "slurm", "ray"], help="where jobs run: child "
                   "processes here (default), a Slurm cluster or a Ray cluster (--home on storage its nodes share)")
    p.add_argument("--gpus", default=None, help="the local backend's GPUs, e.g. 0,1,2,3, or none (default: "
                   "CUDA_VISIBLE_DEVICES, else the GPUs nvidia-smi lists)")
    p.add_argument("--cancel-grace", type=float, default=120.0, help="seconds a cancelled job has to checkpoint "
                   "before it is killed")
    p.add_argument("--slurm-partition", default=None, help="the partition jobs go to (default: Slurm's default)")
    p.add_argument("--slurm-account", default=None, help="the account jobs are charged to")
    p.add_argument("--slurm-extra", default=None, help='more sbatch options for every job, e.g. "--qos high"')
    p.add_argument("--ray-address", default=None, help="with --backend ray: the Ray dashboard's address, where its "
                   "Job Submission API answers, e.g. http://HEAD:8265 (--home and this install at the same paths "
                   "on the Ray nodes)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("jobs", help="talk to a tuning service: submit, list, status, cancel, logs")
    p.add_argument("--url", default=None, help="the service (default $TUNELAB_URL, else http://127.0.0.1:8321)")
    p.add_argument("--api-key", default=None, help="default $TUNELAB_API_KEY")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("submit", help="submit a tunelab config (or a managed request with source_model)")
    a.add_argument("file", help="YAML or JSON")
    a.add_argument("--display-name", default=None, help="the tuned model's endpoint name")
    a.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: one if the server has GPUs)")
    a.add_argument("--nodes", type=int, default=None, help="nodes (default 1; more need --backend slurm)")
    a.add_argument("--cpus", type=int, default=None, help="CPUs per process")
    a.add_argument("--memory-gb", type=float, default=None, help="memory per node")
    a.add_argument("--time-limit", default=None, help='e.g. "2h", "30m", "1:30:00"')
    a.add_argument("--priority", type=int, default=None, help="higher runs first among queued jobs (default 0)")
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
        print(f"{run_files.ERROR_PREFIX} {e}", file=sys.stderr)
        return run_files.EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return run_files.EXIT_INTERRUPTED
    except Exception as e:  # training-time conditions with their own message
        from tunelab.training.checkpoint import CheckpointWriteError
        from tunelab.training.loop import Interrupted, TooManyBadSteps

        if isinstance(e, (Interrupted, TooManyBadSteps, CheckpointWriteError)):
            if os.environ.get("RANK", "0") == "0":  # every rank stops together with the same message: say it once
                prefix = run_files.STOPPED_PREFIX if isinstance(e, Interrupted) else run_files.ERROR_PREFIX
                print(f"{prefix} {e}", file=sys.stderr)
            return run_files.EXIT_INTERRUPTED if isinstance(e, Interrupted) else run_files.EXIT_TRAINING_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
