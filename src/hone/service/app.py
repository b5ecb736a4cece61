"""The FastAPI app: `create_app(settings)` opens the store (upgraded to head), and mounts every router.

    uvicorn --factory hone.service.app:app_from_env      (or `hone api`)

No route is open: every one depends on an API key (auth.require). There are no docs routes (/docs,
/openapi.json), since they would be open. Inference (/v1/chat/completions, /v1/completions) comes from
hone.serve.openai_routes, mounted behind the member role; a request's model id is resolved within the key's
project (another project's fine-tuned model is 404) to what the engine loads: a base model's path, or a
fine-tuned job's run directory (its final/ adapter over the base named in its config.yaml).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hone import __version__
from hone.service import audit, auth, files, jobs, models_routes
from hone.service.actions import Actions, record
from hone.service.errors import APIError, install_handlers
from hone.service.settings import Settings
from hone.service.storage import FileStore
from hone.service.store import open_store

log = logging.getLogger("hone.service")


def create_app(settings: Settings | None = None, *, store=None) -> FastAPI:
    settings = settings or Settings()
    store = store or open_store(settings)
    with store.session() as s:
        models_routes.ensure_embedded_base(s)
    app = FastAPI(title="hone", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.files = FileStore.from_settings(settings)  # sealed with AES-GCM (storage.py)
    app.state.actions = Actions()
    app.state.model_resolver = models_routes.make_resolver(store)
    install_handlers(app)
    app.middleware("http")(_body_limit)
    for router in (auth.router, files.router, jobs.router, models_routes.router):
        app.include_router(router)
    audit.install(app)
    mount_inference(app)
    return app


async def _body_limit(request: Request, call_next):
    """Refuse a declared body over the limit before anything reads it (uploads have their own limit)."""
    settings = request.app.state.settings
    limit = settings.max_upload_bytes + 2**20 if request.url.path == "/v1/files" else settings.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        err = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
        return JSONResponse(err.body(), status_code=413)
    return await call_next(request)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    router = getattr(app.state, "inference_router", None)
    if router is not None and router.engine is not None:
        router.engine.close()


def engine_key(m: models_routes.ResolvedModel) -> str:
    """What hone.serve's engine loads for a model: a base path, or the run directory of a fine-tuned one."""
    if m.adapter_path is None:
        return m.base_path
    run_dir = Path(m.adapter_path).parent
    return str(run_dir) if (run_dir / "config.yaml").is_file() else m.adapter_path


def mount_inference(app: FastAPI) -> bool:
    """Mount the serve package's OpenAI inference routes behind the member role (False if not installed)."""
    try:
        from hone.serve.openai_routes import ModelNotFoundError, inference_router
    except ImportError as e:
        log.warning("inference routes not mounted (%s): /v1/chat/completions is unavailable", e)
        app.state.inference_error = str(e)
        return False

    def resolve(model_id: str, request: Request) -> str:
        # Every chat/completion request is a model use: audited whether or not the model is found.
        try:
            key = engine_key(app.state.model_resolver(request.state.principal.project_id, model_id))
        except APIError as e:
            with app.state.store.session() as s:
                record(request, s, "model.use", "model", model_id, outcome="not_found", path=request.url.path)
            raise ModelNotFoundError(model_id) from e
        with app.state.store.session() as s:
            record(request, s, "model.use", "model", model_id, path=request.url.path)
        return key

    router = inference_router(resolve, auth_dependency=auth.member)
    app.include_router(router)
    app.state.inference_router = router
    return True


def app_from_env() -> FastAPI:
    return create_app(Settings())
