"""The tuning service (`tunelab serve`): a layer on top of the trainer.

It takes tuning jobs over HTTP, runs each as a `tunelab train` child process, keeps its state in SQLite under
--home, and serves the tuned models. The trainer knows nothing of it. Modules, one job each:

- settings.py   ServeSettings, what `tunelab serve` was started with
- app.py        create_app(settings): the FastAPI app, its routers and the scheduler's lifespan
- store.py      the database (SQLite, WAL, versioned migrations) behind a small interface
- jobspec.py    a request -> a validated tunelab Config (paths, code-running keys, data rows)
- scheduler.py  the job queue: hands jobs to a backend, follows their progress, retries, survives restarts
- backends/     where jobs run: base.py (the interface), local.py (child processes on this machine's GPUs), slurm.py
- jobs_api.py   the /v1/tuningJobs, /v1/files and /v1/endpoints routes
- registry.py   names -> models (endpoints of finished jobs, --model base models)
- security.py   API key, loopback default, paths inside the roots, body size limits
- errors.py     every error as one JSON line: {"error": {"message", "type", "code"}}
- engine.py     the model pool: lazy loading, LoRA adapters switched on one base, LRU, batched generation
- openai_api.py the OpenAI-compatible /v1/models, /v1/chat/completions and /v1/completions routes
- openai_ft.py  OpenAI's fine-tuning API on the same jobs: /v1/fine_tuning/jobs, pause/resume, events, checkpoints,
                DELETE /v1/models/{name}, the grader routes (openai_spec.py: request -> Config and the "auto" rules;
                openai_ft_views.py: OpenAI's shapes; openai_models.py: ft: names and checkpoints as models;
                openai_files.py: file content and delete)
- remote.py     the client side of those routes for `tunelab generate URL` / `tunelab chat URL` (stdlib only)
"""
