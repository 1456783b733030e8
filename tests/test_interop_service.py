"""axolotl and LLaMA-Factory configs through tunelab.api and the tuning service: each becomes the Config that
`tunelab train FILE` runs (tunelab.interop.load, the CLI's own path), says the same notes and trains a few steps;
the service resolves a peer config's paths inside its roots and refuses, one line, what lies outside them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from service_util import Server  # noqa: E402
from test_interop import LF_DATA, PEERS, for_tiny, rows, write  # noqa: E402
from tiny import make_base_model  # noqa: E402

import tunelab  # noqa: E402
from tunelab.interop import load  # noqa: E402

STEPS = 2
AXOLOTL = "llama-3__instruct-lora-8b.yml"  # chat_template rows; load_in_8bit, adamw_bnb_8bit, evals_per_epoch noted
LLAMAFACTORY = "train_lora__qwen3_lora_sft.yaml"  # two alpaca datasets from dataset_info.json; trust_remote_code


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    data = root / "data"
    (data / "lf").mkdir(parents=True)
    shutil.copy(PEERS / "llamafactory" / "dataset_info.json", data / "lf")
    for file, kind in LF_DATA.items():
        write(data / "lf" / file, rows(kind))
    write(data / "messages.jsonl", rows("messages"))
    shutil.copytree(make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0), data / "models" / "tiny")
    server = Server(root / "home", "--data-root", str(data), "--max-retries", "0").start()
    yield {"root": root, "data": data, "model": str(data / "models" / "tiny"), "server": server}
    server.stop()


def axolotl(env, **replace) -> dict:
    """The example on the tiny model for STEPS steps, its dataset the local messages file (absolute paths: the same
    dict is valid on the command line and, being inside the data root, in a request)."""
    data = yaml.safe_load((PEERS / "axolotl" / AXOLOTL).read_text())
    dataset = {**data["datasets"][0], "path": str(env["data"] / "messages.jsonl")}
    return for_tiny(data, {"base_model": env["model"], "datasets": [dataset], "sequence_len": 256, "max_steps": STEPS,
                           "micro_batch_size": 2, "gradient_accumulation_steps": 1, "val_set_size": 0, **replace})


def llamafactory(env, **replace) -> dict:
    data = yaml.safe_load((PEERS / "llamafactory" / LLAMAFACTORY).read_text())
    return for_tiny(data, {"model_name_or_path": env["model"], "cutoff_len": 256, "max_steps": STEPS,
                           "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                           "dataset_dir": str(env["data"] / "lf"), **replace})


def as_file(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_api_takes_peer_configs_as_the_cli_does(env, tmp_path, capsys):
    """tunelab.load_config / tunelab.train on an axolotl and a LLaMA-Factory config, as a path or a dict: the Config
    `tunelab train FILE` runs, the CLI's notes printed (quiet=True: none), and STEPS steps trained."""
    for name, data in (("axolotl", axolotl(env, output_dir=str(tmp_path / "ax"))),
                       ("LLaMA-Factory", llamafactory(env, trust_remote_code=False, output_dir=str(tmp_path / "lf")))):
        path = as_file(data, tmp_path / f"{name}.yaml")
        cli_notes = []
        cli = load(path, say=cli_notes.append)
        capsys.readouterr()
        assert tunelab.load_config(path) == cli and capsys.readouterr().out.splitlines() == cli_notes
        assert tunelab.load_config(data) == cli
        said = capsys.readouterr().out.splitlines()
        assert said[0].startswith(f"config: read as a{'n' if name == 'axolotl' else ''} {name} config")
        assert said[1:] == cli_notes[1:] and len(said) > 1  # one line per key mapped differently
        assert tunelab.load_config(data, {"train.lr": 1e-3}, quiet=True).train.lr == 1e-3
        assert capsys.readouterr().out == ""
        run = tunelab.train(data, {"log.tensorboard": False, "train.progress": False, "train.log_every": 1}, quiet=True)
        assert run == Path(cli.output_dir) and (run / "final" / "adapter_config.json").is_file()
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line] == list(range(1, STEPS + 1))
    with pytest.raises(tunelab.UserError, match="axolotl key 'relora'"):
        tunelab.load_config(axolotl(env, relora=True))


def post(env, config: dict) -> httpx.Response:
    return httpx.post(env["server"].url + "/v1/tuningJobs", json={"config": config}, timeout=60)


def refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]["message"]
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)


def test_service_refuses_peer_paths_outside_its_roots(env):
    """A peer config's dataset paths, dataset_dir (read for dataset_info.json) and output_dir go through the
    service's resolver like a tunelab config's; keys it cannot honour, and keys that would run code or upload,
    are refused as for tunelab configs. None of it creates a job."""
    root, data = env["root"], env["data"]
    (root / "secret.jsonl").write_text(json.dumps(rows("messages")[0]) + "\n")
    (root / "outside_lf").mkdir(exist_ok=True)
    shutil.copy(PEERS / "llamafactory" / "dataset_info.json", root / "outside_lf")
    (data / "escape").mkdir(exist_ok=True)  # inside the root, but naming a file outside it
    escape = {"identity": {"file_name": str(root / "secret.jsonl")}, "alpaca_en_demo": {"file_name": "../../secret.jsonl"}}
    (data / "escape" / "dataset_info.json").write_text(json.dumps(escape))
    (data / "linked").mkdir(exist_ok=True)  # inside the root, its dataset_info.json a link out of it
    (data / "linked" / "dataset_info.json").unlink(missing_ok=True)
    (data / "linked" / "dataset_info.json").symlink_to(root / "outside_lf" / "dataset_info.json")
    before = httpx.get(env["server"].url + "/v1/tuningJobs").json()["tuning_jobs"]
    dataset = yaml.safe_load((PEERS / "axolotl" / AXOLOTL).read_text())["datasets"][0]
    lf = llamafactory(env, trust_remote_code=False)

    refused(post(env, axolotl(env, datasets=[{**dataset, "path": str(root / "secret.jsonl")}])), 400,
            "axolotl datasets[0].path", "outside")
    refused(post(env, axolotl(env, datasets=[{**dataset, "path": "../secret.jsonl"}])), 400, "'..'")
    refused(post(env, axolotl(env, datasets=[{**dataset, "path": "fozziethebeat/alpaca_messages_2k_test"}])), 400,
            "axolotl datasets[0].path", "not found")
    refused(post(env, {**lf, "dataset_dir": str(root / "outside_lf")}), 400, "LLaMA-Factory dataset_dir", "outside")
    refused(post(env, {**lf, "dataset_dir": str(data / "linked")}), 400, "LLaMA-Factory dataset_dir", "outside")
    refused(post(env, {**lf, "dataset_dir": str(data / "escape"), "dataset": "identity"}), 400, "data.train[0].path",
            "outside")
    refused(post(env, {**lf, "dataset_dir": str(data / "escape"), "dataset": "alpaca_en_demo"}), 400, "'..'")
    refused(post(env, {**lf, "output_dir": "/tmp/elsewhere"}), 400, "output_dir", "outside")
    refused(post(env, axolotl(env, relora=True)), 400, "axolotl key 'relora'")
    refused(post(env, llamafactory(env)), 403, "model.trust_remote_code", "--allow-code")  # the example as it is
    refused(post(env, axolotl(env, hub_model_id="someone/model")), 403, "output.hub_model_id")
    refused(post(env, axolotl(env, wandb_project="p")), 403, "log.wandb")
    assert httpx.get(env["server"].url + "/v1/tuningJobs").json()["tuning_jobs"] == before


def test_service_trains_peer_configs_as_the_cli_would(env, tmp_path, capsys):
    """POST /v1/tuningJobs {"config": <axolotl | LLaMA-Factory dict>}, from `tunelab jobs submit FILE` and the
    client's TuningJob.create: the create response carries the notes (`converted_from`, printed by `jobs submit`),
    they open the job's log, and the job runs the Config `tunelab train FILE` builds (but for the run dir the
    server chooses and its progress bar off), STEPS steps to SUCCEEDED."""
    from tunelab.cli import main as cli_main
    from tunelab.client import TuningJob, init

    init(url=env["server"].url, api_key=None)
    jobs = {}
    for tool, data in (("axolotl", axolotl(env)), ("LLaMA-Factory", llamafactory(env, trust_remote_code=False))):
        path = as_file(data, tmp_path / f"{tool}.yaml")
        if tool == "axolotl":
            capsys.readouterr()
            assert cli_main(["jobs", "--url", env["server"].url, "submit", str(path)]) == 0
            printed = capsys.readouterr().out.splitlines()
            job, said = TuningJob(printed[0].split()[0]), printed[1:]
        else:
            job = TuningJob.create({"config": data})
            assert job.converted_from["tool"] == tool
            said = job.converted_from["notes"]
        notes = []
        cli = load(path, say=notes.append)
        assert said[0].startswith("config: read as a") and said[1:] == notes[1:]
        jobs[tool] = (job, cli, said)
    for tool, (job, cli, said) in jobs.items():
        job.wait(poll=0.5, timeout=600)
        assert job.state == "JOB_STATE_SUCCEEDED", (tool, job.error)
        served = job.to_dict()
        expected = cli.model_dump(mode="json")
        for config in (served["config"], expected):
            config.pop("output_dir")
            config["train"].pop("progress")
        assert served["config"] == expected, tool
        log = httpx.get(f"{env['server'].url}/v1/tuningJobs/{job.id}/logs", params={"tail": 10_000}).text
        assert log.splitlines()[:len(said)] == said
        assert f"done at step {STEPS}/{STEPS}" in log  # (LLaMA-Factory's logging_steps 10: no metrics row before)
        assert served["progress"]["step"] == STEPS, tool  # from that line when no metrics row came
        assert (Path(served["tuned_model"]["path"]) / "adapter_config.json").is_file()
