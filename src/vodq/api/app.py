"""The FastAPI application: routes stay thin and call the service layer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vodq.api.auth import install_admin_auth
from vodq.api.json_body import reject_repeated_keys
from vodq.api.limits import BodySizeLimit
from vodq.api.models import (
    BatchPriorityIn,
    BatchPriorityOut,
    ConfigChanges,
    ConfigReport,
    ConfigValue,
    ErrorResponse,
    HealthOut,
    PauseIn,
    PauseOut,
    PriorityIn,
    PriorityOut,
    SkipUploadIn,
    StatusOut,
    UploadsIn,
    UploadsOut,
    VodIn,
    VodOut,
    VodPage,
    VodRef,
)
from vodq.config import variable_name
from vodq.errors import (
    InvalidInput,
    InvalidTransition,
    StorageUnavailable,
    VodNotFound,
    VodqError,
)
from vodq.models import VodState
from vodq.service import NewVod, Service, VodSelection

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 422, 503)
}
# Admin routes also answer the auth middleware's refusals.
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    **{code: {"model": ErrorResponse} for code in (401, 403, 429)},
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"model": ErrorResponse}}


def create_app(service: Service, *, manage_lifecycle: bool = True) -> FastAPI:
    """Build the app; with ``manage_lifecycle`` it also starts and stops ``service``."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            service.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                service.stop()

    # No trailing-slash redirects: they would be built from the client's Host
    # header and send a POST with its body wherever that names.
    app = FastAPI(
        title="vodq",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,
        dependencies=[Depends(reject_repeated_keys)],
    )
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit)
    install_admin_auth(app, service.settings)

    @app.get("/healthz", response_model=HealthOut, responses=UNAVAILABLE)
    def healthz() -> HealthOut:
        service.queue.counts()
        return HealthOut(status="ok")

    @app.head("/healthz", include_in_schema=False)
    def healthz_head() -> Response:
        service.queue.counts()
        return Response()

    @app.head("/status", include_in_schema=False)
    def status_head() -> Response:
        service.queue.counts()
        return Response()

    @app.get("/status", response_model=StatusOut, responses=UNAVAILABLE)
    def status() -> StatusOut:
        return StatusOut.model_validate(service.status())

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(
            generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/vods", response_model=VodPage, responses=ERRORS)
    def list_vods(
        state: VodState | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    ) -> VodPage:
        vods = service.queue.list_vods(state=state, limit=limit + 1, after_id=after)
        page = vods[:limit]
        next_after = page[-1].id if len(vods) > limit else None
        return VodPage(
            items=[VodOut.from_vod(vod) for vod in page], next_after=next_after
        )

    @app.get("/vods/{vod_id}", response_model=VodOut, responses=ERRORS)
    def get_vod(vod_id: str) -> VodOut:
        return VodOut.from_vod(service.get_vod(vod_id))

    @app.post(
        "/admin/vods",
        response_model=VodOut,
        status_code=201,
        responses={200: {"model": VodOut}, **ADMIN_ERRORS},
    )
    def add_vod(body: VodIn, response: Response) -> VodOut:
        vod, created = service.add_vod(NewVod(**body.model_dump()))
        response.status_code = 201 if created else 200
        return VodOut.from_vod(vod)

    @app.post("/admin/vod/priority", response_model=PriorityOut, responses=ADMIN_ERRORS)
    def set_priority(body: PriorityIn) -> PriorityOut:
        vod = service.set_priority(body.vod_id, body.priority)
        return PriorityOut(status="ok", vod_id=vod.vod_id, priority=vod.priority)

    @app.post(
        "/admin/vods/priority", response_model=BatchPriorityOut, responses=ADMIN_ERRORS
    )
    def set_priorities(body: BatchPriorityIn) -> BatchPriorityOut:
        selection = VodSelection(
            vod_ids=body.vod_ids,
            date_from=body.date_from,
            date_to=body.date_to,
            channel=body.channel,
            states=body.states,
        )
        updated = service.set_priorities(body.priority, selection)
        return BatchPriorityOut(status="ok", priority=body.priority, updated=updated)

    @app.post("/admin/vod/cancel", response_model=VodOut, responses=ADMIN_ERRORS)
    def cancel_vod(body: VodRef) -> VodOut:
        return VodOut.from_vod(service.cancel_vod(body.vod_id))

    @app.post("/admin/vod/reprocess", response_model=VodOut, responses=ADMIN_ERRORS)
    def reprocess_vod(body: VodRef) -> VodOut:
        return VodOut.from_vod(service.reprocess_vod(body.vod_id))

    @app.post("/admin/vod/skip-upload", response_model=VodOut, responses=ADMIN_ERRORS)
    def skip_upload(body: SkipUploadIn) -> VodOut:
        return VodOut.from_vod(service.set_skip_upload(body.vod_id, body.skip))

    @app.post("/admin/uploads", response_model=UploadsOut, responses=ADMIN_ERRORS)
    def queue_uploads(body: UploadsIn) -> UploadsOut:
        queued, missing = service.queue_uploads(
            body.vod_ids, all_not_uploaded=body.all_not_uploaded
        )
        return UploadsOut(status="ok", queued=queued, missing_files=missing)

    @app.delete("/admin/vod/{vod_id}", response_model=VodOut, responses=ADMIN_ERRORS)
    def delete_vod(vod_id: str, delete_files: bool = False) -> VodOut:
        return VodOut.from_vod(service.delete_vod(vod_id, delete_files=delete_files))

    @app.get("/admin/config", response_model=ConfigReport, responses=ADMIN_ERRORS)
    def get_config() -> ConfigReport:
        return _config_out(service.config_report())

    @app.patch("/admin/config", response_model=ConfigReport, responses=ADMIN_ERRORS)
    def patch_config(body: ConfigChanges, stop_excess: bool = False) -> ConfigReport:
        service.update_config(_config_changes(body), stop_excess=stop_excess)
        return _config_out(service.config_report())

    @app.post("/admin/queue/pause", response_model=PauseOut, responses=ADMIN_ERRORS)
    def pause(body: PauseIn | None = None) -> PauseOut:
        stop_running = body.stop_running if body is not None else False
        stopped = service.pause(stop_running=stop_running)
        return PauseOut(status="ok", paused=True, stopped=stopped)

    @app.post("/admin/queue/resume", response_model=PauseOut, responses=ADMIN_ERRORS)
    def resume() -> PauseOut:
        service.resume()
        return PauseOut(status="ok", paused=False, stopped=0)

    return app


def _config_changes(body: ConfigChanges) -> dict[str, str | None]:
    """Map each variable of a PATCH body, in any case, to its new value."""
    changes: dict[str, str | None] = {}
    spellings: dict[str, str] = {}
    for name, value in body.items():
        variable = variable_name(name)
        if variable in spellings:
            # Applying one of them would drop the other unannounced.
            raise InvalidInput(
                f"{spellings[variable]!r} and {name!r} both set {variable}; "
                "send it once"
            )
        spellings[variable] = name
        changes[variable] = None if value is None else str(value)
    return changes


def _config_out(report: dict[str, dict[str, Any]]) -> ConfigReport:
    return {name: ConfigValue.model_validate(entry) for name, entry in report.items()}


def _install_error_handlers(app: FastAPI) -> None:
    statuses: list[tuple[type[VodqError], int]] = [
        (VodNotFound, 404),
        (InvalidInput, 400),
        (InvalidTransition, 409),
        (StorageUnavailable, 503),
    ]

    async def domain_error(_request: Request, exc: Exception) -> JSONResponse:
        code = next((c for kind, c in statuses if isinstance(exc, kind)), 500)
        return JSONResponse({"error": str(exc)}, status_code=code)

    async def unencodable_text(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse(
            {
                "error": "the request contains text that is not valid Unicode "
                "(a lone surrogate such as \\ud800); send UTF-8 text"
            },
            status_code=400,
        )

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"error": _describe_validation(exc)}, status_code=422)

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    async def database_error(_request: Request, exc: Exception) -> JSONResponse:
        reason = getattr(exc, "orig", None) or exc
        first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else ""
        return JSONResponse(
            {"error": f"the database is unavailable: {first_line}; retry shortly"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    app.add_exception_handler(VodqError, domain_error)
    app.add_exception_handler(UnicodeEncodeError, unencodable_text)
    app.add_exception_handler(OperationalError, database_error)
    app.add_exception_handler(InterfaceError, database_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(
            str(part) for part in error.get("loc", ()) if part != "body"
        )
        parts.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)
