"""create_app(settings): the service's one FastAPI app. Routers plug in here; the scheduler runs in its lifespan."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import dashboard, errors, jobs_api, openai_api, openai_files, openai_ft
from .backends import make_backend
from .engine import Engine
from .registry import Registry
from .scheduler import Scheduler
from .security import Guard
from .settings import ServeSettings
from .store import SQLiteStore


def create_app(settings: ServeSettings) -> FastAPI:
    settings.home.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(settings.home / "tunelab.db")
    app_backend = make_backend(settings)  # a backend that cannot work refuses here, before the server listens
    scheduler = Scheduler(settings, store, app_backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            app.state.engine.close()

    app = FastAPI(title="tunelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.store = store
    app.state.registry = Registry(settings, store)
    app.state.scheduler = scheduler
    app.state.backend = app_backend
    app.state.engine = Engine(max_loaded=settings.max_loaded)
    # Paths served without the API key: no data behind them. Routers add theirs (an entry ending in '/' is a prefix).
    app.state.public_paths = {"/healthz"}
    app.add_middleware(Guard, settings=settings, public=app.state.public_paths)
    errors.install(app)
    app.include_router(jobs_api.router)
    app.include_router(openai_files.router)
    app.include_router(openai_ft.router)  # before openai_api: its DELETE /v1/models/{name} beside GET
    app.include_router(openai_api.router)
    app.state.public_paths |= dashboard.PUBLIC
    app.include_router(dashboard.router)
    return app


def serve(settings: ServeSettings) -> None:
    """`tunelab serve`: refuse an unsafe bind, then run the app under uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    from .security import check_bind

    check_bind(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
