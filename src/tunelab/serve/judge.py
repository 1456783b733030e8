"""This server as the judge of model graders (score_model, label_model): its own engine answers them.

- /v1/fine_tuning/alpha/graders/run asks the engine in-process (EngineJudge), through the very request
  /v1/chat/completions builds, so its reward is what that route's reply parses to.
- A job's trainer knows nothing of the service: a job with a model grader gets `grpo.judge_endpoint` = this
  server's URL (own_url) and api_key_env = JUDGE_KEY_ENV, and the backend hands it the server's API key in that
  environment variable (job_env): the key is never in a config file or the database.
- A grader's `model` must be a model this server serves (registry: a --model base, an `ft:` model or checkpoint);
  check_models refuses others with the field's path.
"""

from __future__ import annotations

import asyncio
import socket

from tunelab import graders
from tunelab.config import Config, JudgeEndpoint, UserError

from .engine import target_of
from .errors import ApiError
from .openai_api import ChatRequest
from .origins import ANY_ADDRESS, is_loopback

JUDGE_KEY_ENV = "TUNELAB_JUDGE_API_KEY"


class EngineJudge:
    """`judge(messages, model, sampling_params) -> text` on the server's engine; called from a worker thread while
    `loop` (the server's event loop) runs the engine's side."""

    def __init__(self, registry, engine, loop: asyncio.AbstractEventLoop):
        self.registry, self.engine, self.loop = registry, engine, loop

    def __call__(self, messages: list[dict], model: str, params: dict) -> str:
        return asyncio.run_coroutine_threadsafe(self._answer(messages, model, params), self.loop).result()

    async def _answer(self, messages: list[dict], model: str, params: dict) -> str:
        body = ChatRequest.model_validate({"model": model, "messages": messages, **graders.chat_params(params)})
        ref = self.registry.resolve(model)
        if ref is None:  # deleted since check_models
            raise graders.JudgeUnavailable(f"the judge model {model!r} is no longer served")
        job = self.engine.submit(target_of(ref.path), body.engine_request(
            body.max_completion_tokens or body.max_tokens, messages=messages))
        try:
            return (await job.result()).text
        finally:
            job.cancelled = True


def check_models(grader: dict, registry, where: str = "grader") -> None:
    """ApiError 400 naming the field (e.g. grader.graders.style.model) of a judge model this server does not serve."""
    missing = unserved(grader, registry, where)
    if missing is not None:
        path, model = missing
        served = ", ".join(ref.name for ref in registry.list()) or "none"
        raise ApiError(400, f"{path}: the judge model {model!r} is not served here; a model grader's judge is a "
                            f"model of this server (served: {served})", path, "model_not_found")


def unserved(grader: dict, registry, where: str) -> tuple[str, str] | None:
    """(field path, model) of the first judge model of `grader` this server does not serve, or None."""
    return next(((path, model) for path, model in graders.judge_models(grader, where)
                 if registry.resolve(model) is None), None)


def own_url(settings) -> str:
    """The API root a job reaches this server by. Jobs on other nodes (slurm, ray) cannot reach a loopback address;
    a server bound to every interface is reached by this host's address."""
    host = settings.host
    if settings.backend != "local" and is_loopback(host):
        raise UserError(f"a model grader's judge is this server, which listens on {host} only: jobs the "
                        f"{settings.backend} backend runs on other nodes cannot reach it. Start it with --host set "
                        "to an address the nodes reach (and --api-key)")
    if host in ANY_ADDRESS:
        host = "127.0.0.1" if settings.backend == "local" else _this_address(settings.backend)
    if settings.port == 0:
        raise UserError("a model grader's judge is this server, whose port was chosen at start (--port 0); "
                        "give --port")
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/v1"


def _this_address(backend: str) -> str:
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    if is_loopback(address):
        raise UserError(f"a model grader's judge is this server, bound to every interface, but this host's name "
                        f"resolves to {address}: start it with --host set to the address the {backend} nodes reach")
    return address


def with_judge(cfg: Config, settings, registry) -> Config:
    """A job's config with this server as the judge of its model graders (checked to be served here). UserError
    for a server its jobs cannot reach. A config that names its own grpo.judge_endpoint keeps it."""
    found = [(key, g) for key, g in cfg.grpo.grader_entries() if graders.judge_models(g)]
    if cfg.method != "grpo" or not found or cfg.grpo.judge_endpoint is not None:
        return cfg
    for key, grader in found:
        missing = unserved(grader, registry, key)
        if missing is not None:
            raise UserError(f"{missing[0]}: the judge model {missing[1]!r} is not served by this server")
    endpoint = JudgeEndpoint(base_url=own_url(settings), api_key_env=JUDGE_KEY_ENV)
    return cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"judge_endpoint": endpoint})})


def job_env(config: dict, settings) -> dict[str, str]:
    """The environment a job gets from the server: its API key, for a job whose judge is this server."""
    endpoint = ((config or {}).get("grpo") or {}).get("judge_endpoint") or {}
    if endpoint.get("api_key_env") != JUDGE_KEY_ENV:
        return {}
    return {JUDGE_KEY_ENV: settings.api_key or ""}
