"""The HTTP surface: OpenAI's fine-tuning routes under ``/v1``, each one tenant's namespace only.

Every route resolves the bearer token to a tenant first (401 otherwise) and reads or writes only
that tenant's namespace and file prefix; an id of another tenant's job, file or model gets the
same 404 as an id that does not exist. Errors come back in OpenAI's format (``errors.py``).
Route functions are plain ``def``: FastAPI runs them in its thread pool, so the blocking
Kubernetes and object-store calls never stall the event loop.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at definition
# time, and `Auth` below is local to create_app (a string annotation could not be resolved).
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune_gateway import mapping
from kubetune_gateway.config import GatewaySettings, Tenant, TenantDirectory
from kubetune_gateway.errors import ApiError, bad_request, not_found, quota_exceeded, unauthorized
from kubetune_gateway.files import FileStore, upload_settings
from kubetune_gateway.kube import Kube, KubeError


def _kube_error(e: KubeError) -> ApiError:
    if e.status == 403 and "exceeded quota" in e.message:
        # The namespace's ResourceQuota (e.g. count/finetunejobs.kubetune.io) said no.
        return quota_exceeded(f"the namespace's ResourceQuota refused the job: {e.message}")
    if e.status in (400, 422):
        return bad_request(f"the cluster refused the job: {e.message}")
    if e.status == 409:
        return ApiError(409, e.message, code="conflict")
    return ApiError(
        502, f"the cluster answered {e.status} {e.reason}", type="api_error", code="upstream_error"
    )


def create_app(settings: GatewaySettings, kube: Kube, files: FileStore, tenants: TenantDirectory) -> FastAPI:
    app = FastAPI(title="kubetune OpenAI-compatible fine-tuning gateway", docs_url=None, redoc_url=None)
    quota_locks: dict[str, threading.Lock] = {}
    locks_guard = threading.Lock()

    @app.exception_handler(ApiError)
    def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(KubeError)
    def _kube(_: Request, exc: KubeError) -> JSONResponse:
        err = _kube_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": [], "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        err = bad_request(f"{param or 'request'}: {first['msg']}", param=param)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (
            "not implemented by kubetune's gateway" if exc.status_code in (404, 405) else str(exc.detail)
        )
        err = ApiError(
            exc.status_code, message, code="not_implemented" if exc.status_code in (404, 405) else None
        )
        return JSONResponse(err.body(), status_code=exc.status_code)

    def tenant(authorization: Annotated[str | None, Header()] = None) -> Tenant:
        if not authorization or not authorization.startswith("Bearer "):
            raise unauthorized("You didn't provide an API key (Authorization: Bearer <token>).")
        found = tenants.resolve(authorization.removeprefix("Bearer ").strip())
        if found is None:
            raise unauthorized()
        return found

    Auth = Annotated[Tenant, Depends(tenant)]

    def gateway_job(who: Tenant, job_id: str) -> dict[str, Any]:
        ftj = kube.get_job(who.namespace, job_id) if job_id.startswith(mapping.JOB_PREFIX) else None
        if ftj is None or not mapping.is_gateway_job(ftj):
            raise not_found("fine-tuning job", job_id)
        return ftj

    def jobs_newest_first(who: Tenant) -> list[dict[str, Any]]:
        jobs = [mapping.job_object(j) for j in kube.list_jobs(who.namespace)]
        return sorted(jobs, key=lambda j: (j["created_at"], j["id"]), reverse=True)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # --- files ---------------------------------------------------------------------------------

    @app.post("/v1/files")
    def upload_file(
        who: Auth, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise bad_request(f"purpose {purpose!r} is not supported (only 'fine-tune')", param="purpose")
        return files.upload(who.namespace, mapping.new_file_id(), file.filename or "upload.jsonl", file.file)

    @app.get("/v1/files")
    def list_files(
        who: Auth,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
    ) -> dict[str, Any]:
        found = [f for f in files.list_files(who.namespace) if purpose in (None, f["purpose"])]
        if order == "asc":
            found.reverse()
        page, more = mapping.paginate(found, after, limit, max_limit=10000)
        return mapping.list_object(page, more)

    def own_file(who: Tenant, file_id: str) -> dict[str, Any]:
        info = files.get(who.namespace, file_id)
        if info is None:
            raise not_found("file", file_id)
        return info

    @app.get("/v1/files/{file_id}")
    def retrieve_file(who: Auth, file_id: str) -> dict[str, Any]:
        return own_file(who, file_id)

    @app.get("/v1/files/{file_id}/content")
    def file_content(who: Auth, file_id: str) -> StreamingResponse:
        own_file(who, file_id)
        spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the generator below)
        files.copy_content(who.namespace, file_id, spool)
        spool.seek(0)

        def chunks() -> Iterator[bytes]:
            with spool:
                while chunk := spool.read(1 << 20):
                    yield chunk

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(who: Auth, file_id: str) -> dict[str, Any]:
        own_file(who, file_id)
        files.delete(who.namespace, file_id)
        return {"object": "file", "id": file_id, "deleted": True}

    # --- fine-tuning jobs ----------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(who: Auth, request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("the request body is not JSON") from None
        return await run_in_threadpool(_create_job, who, body)

    def _create_job(who: Tenant, body: Any) -> dict[str, Any]:
        req = mapping.parse_create_request(body)
        base_uri = settings.base_models.get(req.model)
        if base_uri is None:
            raise bad_request(
                f"Model {req.model!r} is not available for fine-tuning here; available: "
                f"{sorted(settings.base_models)}",
                param="model",
                code="model_not_available",
            )
        for param, file_id in (
            ("training_file", req.training_file),
            ("validation_file", req.validation_file),
        ):
            if file_id is not None and files.get(who.namespace, file_id) is None:
                raise bad_request(
                    f"invalid {param}: no such file: {file_id!r}", param=param, code="invalid_file"
                )
        with locks_guard:
            lock = quota_locks.setdefault(who.namespace, threading.Lock())
        with lock:  # count-then-create for one tenant happens one at a time (one replica)
            active = [
                j for j in kube.list_jobs(who.namespace) if mapping.job_status(j) not in mapping.TERMINAL
            ]
            if len(active) >= who.max_concurrent_jobs:
                raise quota_exceeded(
                    f"tenant {who.name!r} has {len(active)} unfinished fine-tuning jobs; the limit is "
                    f"{who.max_concurrent_jobs}. Wait for one to finish or cancel one."
                )
            job_id = mapping.new_job_id()
            manifest = mapping.build_finetunejob(
                req,
                job_id=job_id,
                namespace=who.namespace,
                base_uri=base_uri,
                template=settings.template,
                output_uri=settings.output_uri,
                training_uri=files.uri(who.namespace, req.training_file),
                validation_uri=files.uri(who.namespace, req.validation_file) if req.validation_file else None,
                created_at=int(time.time()),
            )
            created = kube.create_job(who.namespace, manifest)
        return mapping.job_object(created)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(who: Auth, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        page, more = mapping.paginate(jobs_newest_first(who), after, limit)
        return mapping.list_object(page, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve_job(who: Auth, job_id: str) -> dict[str, Any]:
        return mapping.job_object(gateway_job(who, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(who: Auth, job_id: str) -> dict[str, Any]:
        ftj = gateway_job(who, job_id)
        state = mapping.job_status(ftj)
        if state in mapping.TERMINAL:
            raise bad_request(f"Job {job_id} is already {state}", code="job_not_cancellable")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        patched = kube.patch_job(
            who.namespace,
            job_id,
            # suspend: the operator stops the pods and keeps the record; the annotation says why.
            {
                "metadata": {"annotations": {mapping.ANN_CANCELLED: now}},
                "spec": {"runPolicy": {"suspend": True}},
            },
        )
        return mapping.job_object(patched)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(who: Auth, job_id: str, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        ftj = gateway_job(who, job_id)
        events = mapping.job_events(ftj, kube.job_events(who.namespace, job_id))
        page, more = mapping.paginate(events, after, limit)
        return mapping.list_object(page, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(who: Auth, job_id: str, after: str | None = None, limit: int = 10) -> dict[str, Any]:
        ftj = gateway_job(who, job_id)
        model = str(((ftj.get("spec") or {}).get("model") or {}).get("name", ""))
        markers = files.checkpoint_markers(who.namespace, model) if model else []
        page, more = mapping.paginate(mapping.job_checkpoints(ftj, markers), after, limit)
        return mapping.list_object(page, more)

    # --- models --------------------------------------------------------------------------------

    def models_of(who: Tenant) -> list[dict[str, Any]]:
        found = [mapping.model_object(name, 0, "kubetune") for name in sorted(settings.base_models)]
        jobs = {j["metadata"]["name"]: j for j in kube.list_jobs(who.namespace)}
        for mv in kube.list_model_versions(who.namespace):
            source = ((mv.get("spec") or {}).get("source") or {}).get("name")
            ftj = jobs.get(source or "")
            if ftj is None or ((ftj.get("status") or {}).get("version") or {}).get("name") != mv["spec"].get(
                "version"
            ):
                continue
            created = mapping.epoch(mv["spec"].get("created")) or mapping.epoch(
                mv["metadata"].get("creationTimestamp")
            )
            found.append(mapping.model_object(mapping.fine_tuned_model_id(ftj), created, who.namespace))
        return found

    @app.get("/v1/models")
    def list_models(who: Auth) -> dict[str, Any]:
        return {"object": "list", "data": models_of(who)}

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(who: Auth, model_id: str) -> dict[str, Any]:
        for model in models_of(who):
            if model["id"] == model_id:
                return model
        raise not_found("model", model_id)

    return app


def build(settings: GatewaySettings, kube_factory: Callable[[], Kube] = Kube) -> FastAPI:
    """The app from settings: the object store, the tenants file and the cluster client."""
    files = FileStore(
        settings.files,
        upload_settings(settings.template),
        max_bytes=settings.max_file_bytes,
        output_uri=settings.output_uri,
    )
    return create_app(settings, kube_factory(), files, TenantDirectory(settings.tenants_file))
