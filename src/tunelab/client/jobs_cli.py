"""`tunelab jobs submit|list|status|cancel|logs`: the tuning service from the command line (through tunelab.client)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunelab.client import Client, ServiceError
from tunelab.config import UserError


def run(args) -> int:
    client = Client(args.url, args.api_key)
    try:
        return ACTIONS[args.action](client, args)
    except ServiceError as e:
        raise UserError(str(e)) from None


def submit(client: Client, args) -> int:
    """A YAML/JSON file holding either a whole config (tunelab's, axolotl's or LLaMA-Factory's: the server converts
    a peer's and answers its notes, printed here) or a managed-service request (has source_model)."""
    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML/JSON: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping (a tunelab config, or a request with source_model)")
    body = data if "source_model" in data or "config" in data else {"config": data}
    if args.display_name:
        body["tuned_model_display_name"] = args.display_name
    flags = {key: getattr(args, key) for key in COMPUTE_FLAGS if getattr(args, key) is not None}
    if flags:  # on top of the file's own `compute` section
        body["compute"] = {**(body.get("compute") or {}), **flags}
    job = client.request("POST", "/v1/tuningJobs", body)
    print(f"{job['id']} {job['state']}")
    for line in (job.get("converted_from") or {}).get("notes", []):
        print(line)
    return 0


COMPUTE_FLAGS = ("gpus", "nodes", "cpus", "memory_gb", "time_limit", "priority")  # the request's compute keys


def list_jobs(client: Client, args) -> int:
    page = client.request("GET", "/v1/tuningJobs", query={"state": args.state, "page_size": args.limit})
    for job in page["tuning_jobs"]:
        p = job["progress"]
        print(f"{job['id']}  {job['state'].removeprefix('JOB_STATE_'):<10}  step {p['step']}/{p['total_steps']}  "
              f"{job['method']:<8} {job['tuned_model_display_name'] or '-'}")
    return 0


def status(client: Client, args) -> int:
    job = client.request("GET", f"/v1/tuningJobs/{args.job}")
    print(json.dumps(job if args.json else {k: v for k, v in job.items() if k != "config"}, indent=2))
    return 0


def cancel(client: Client, args) -> int:
    job = client.request("POST", f"/v1/tuningJobs/{args.job}:cancel")
    print(f"{job['id']} {job['state']}")
    return 0


def logs(client: Client, args) -> int:
    print(client.request("GET", f"/v1/tuningJobs/{args.job}/logs", query={"tail": args.tail}, raw=True), end="")
    return 0


ACTIONS = {"submit": submit, "list": list_jobs, "status": status, "cancel": cancel, "logs": logs}
