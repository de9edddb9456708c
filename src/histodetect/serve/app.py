"""The FastAPI app: REST API for programs, a static page for people, one batched model.

    GET  /             the web page (static/index.html, app.js, app.css; no build step)
    GET  /health       liveness, queue depth and how much batching happens
    GET  /v1/model     the model card: architecture, preset, data fingerprint, validation, threshold
    POST /v1/predict   patches as multipart files or base64 JSON -> probability, label, uncertainty,
                       optionally a Grad-CAM overlay PNG
    GET  /docs         the OpenAPI page (/openapi.json)

Every refusal is a JSON body {"error": "..."} with a 4xx status (503 when the
queue is full); anything else is a bug and answers 500.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..data.decode import PATCH_SIZE_PX
from ..errors import UserError
from ..explain import class_activation_maps, render_overlays, resolve_cam_layer
from ..predict import LoadedRun, check_run, mean_over_samples, predict_samples, sample_probabilities, uncertainty_measures
from .batcher import PredictionBatcher, ScoredPatches, ServerBusy
from .inputs import (
    JSON_TYPE,
    MULTIPART,
    DecodedUploads,
    RequestError,
    ServeConfig,
    check_query,
    check_tta,
    decode_uploads,
    read_uploads,
    too_large_message,
)

STATIC_DIR = Path(__file__).parent / "static"


class PatchResult(BaseModel):
    id: str = Field(description="the file name (multipart) or the JSON item's id (else patchN)")
    prob_tumour: float = Field(description="calibrated probability of tumour in the centre 32x32, mean over TTA views")
    label: int = Field(description="1 (tumour) when prob_tumour >= `threshold`, else 0")
    entropy_bits: float = Field(description="uncertainty: predictive entropy of prob_tumour in bits (0 certain, 1 = 0.5)")
    prob_sd_tta: float | None = Field(None, description="uncertainty: spread of the probability over the dihedral "
                                                         "views (only with tta 4 or more)")
    resized_from: list[int] | None = Field(None, description="original [width, height] when resized to 96x96")
    converted_from: str | None = Field(None, description="original colour mode when not RGB")
    overlay_png_base64: str | None = Field(None, description="Grad-CAM heat map over the patch, PNG, base64 "
                                                             "(only with overlay=true)")
    patch_png_base64: str | None = Field(None, description="the patch as scored (decoded, RGB, 96x96), PNG, base64 "
                                                           "(only with preview=true): browsers do not display TIFF")


class PredictResponse(BaseModel):
    model: str
    threshold: float = Field(description="the decision threshold chosen on validation for this many TTA views")
    temperature: float
    tta: int
    results: list[PatchResult]


class ErrorBody(BaseModel):
    error: str = Field(description="one line: what was wrong, where, and how to fix it")


_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "malformed body: JSON, base64 or multipart that cannot be parsed"),
    (413, "body over the size limit, too many patches, or an image too large to decode"),
    (415, f"Content-Type is neither {MULTIPART} nor {JSON_TYPE}"),
    (422, "not an image, truncated, not 96x96 (without --resize), or a missing field"),
    (503, "the queue is full; retry after Retry-After seconds (the server's estimate of when it has room)"),
)}

_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    MULTIPART: {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "96x96 RGB patch images (PNG, JPEG, TIFF)"}},
    }},
    JSON_TYPE: {"schema": {
        "type": "object", "required": ["patches"],
        "properties": {"patches": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["image_base64"],
            "properties": {"id": {"type": "string"},
                           "image_base64": {"type": "string", "format": "byte",
                                            "description": "the image file's bytes in standard base64"}},
        }}},
    }},
}}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, from Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _error(413, too_large_message(self.max_bytes))(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise RequestError(too_large_message(self.max_bytes), 413)
            return message

        await self.app(scope, limited_receive, send)


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected: after the body, an ASGI receive() waits for http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def scored_unless_client_gone(request: Request, future: Future) -> ScoredPatches | None:
    """The batcher's answer, or None when the client disconnects first; its job is then cancelled.

    Starlette does not cancel an endpoint whose client has gone, so without this
    the batcher would score every abandoned request. Cancelling takes a queued job
    out of the queue at once; a job already being scored runs on and its answer is
    dropped. Waiting on receive() wakes only on the disconnect, where polling
    `request.is_disconnected()` would wake every waiting request a few times a second.
    """
    scored, gone = asyncio.wrap_future(future), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((scored, gone), return_when=asyncio.FIRST_COMPLETED)
        return scored.result() if scored.done() else None
    finally:  # also when this request is cancelled (server shutdown)
        gone.cancel()
        scored.cancel()  # cancels `future` too, unless the worker has started on it


def best_epoch(run_dir: Path) -> dict | None:
    """The metrics.csv row of the best validation AUC (the epoch best.pt holds), as numbers."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
    if not rows:
        return None
    best = max(rows, key=lambda row: row.get("val_auc", -1))
    return {**best, "epoch": int(best["epoch"])}


def overlay_refusal(run: LoadedRun) -> str | None:
    """Why this model can have no Grad-CAM overlays (a vision transformer has no feature map), or None."""
    try:
        resolve_cam_layer(run.model, None, run.crop_px or PATCH_SIZE_PX)
    except UserError as error:
        return str(error)
    return None


def model_card(run: LoadedRun, config: ServeConfig, no_overlay_because: str | None = None) -> dict:
    """What `GET /v1/model` answers: where the model came from, how good it was, how it is served."""
    info = run.run
    data = info.get("data", {})
    return {
        "run": run.run_dir.name,
        "architecture": run.config.get("model"),
        "parameters": info.get("model", {}).get("parameters"),
        "preset": info.get("preset"),
        "data": {"fingerprint": data.get("fingerprint"), "n_train": data.get("n_train"), "n_val": data.get("n_val"),
                 "train_split": data.get("train_split"), "val_split": data.get("val_split")},
        "preprocessing": {"mean": list(run.mean), "std": list(run.std), "crop_px": run.crop_px,
                          "patch_size_px": PATCH_SIZE_PX},
        # The one the server decides with by default (its --tta); the page shows it.
        "threshold": run.threshold_for(config.tta),
        "thresholds_by_tta": {str(views): t for views, t in sorted(run.thresholds.items())},
        "calibration": {"temperature": run.temperature, **(info.get("calibration") or {})},
        "validation": {"best_epoch": best_epoch(run.run_dir), "best_val_auc": info.get("best_val_auc")},
        "training": {key: info.get(key) for key in ("started", "finished", "epochs_run", "stopped_because",
                                                    "train_seconds", "device")},
        "versions": info.get("versions"),
        "serving": {"histodetect": __version__, "max_upload_bytes": config.max_upload_bytes,
                    "max_files": config.max_files, "max_image_pixels": config.max_image_pixels,
                    "resize": config.resize, "tta": config.tta, "tta_choices": list(run.tta_choices),
                    "overlay": None if no_overlay_because else "gradcam", "no_overlay_because": no_overlay_because},
    }


def _png_base64(image_uint8: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image_uint8).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _results(run: LoadedRun, decoded: DecodedUploads, logits: np.ndarray, cams: np.ndarray | None,
             tta: int, preview: bool = False) -> PredictResponse:
    """The same arithmetic as predict_to_csv: mean of the calibrated views' probabilities.

    Overlays print that same probability (of the request's `tta` views), not the
    one view the Grad-CAM pass saw.
    """
    sample_probs = sample_probabilities(logits, run.temperature)  # (N, 1, tta)
    probs = mean_over_samples(sample_probs)
    overlays = render_overlays(decoded.patches, cams, probs) if cams is not None else None
    threshold = run.threshold_for(tta)
    measures = uncertainty_measures(sample_probs, threshold)
    results = []
    for i, name in enumerate(decoded.names):
        resized = decoded.resized_from[i]
        results.append(PatchResult(
            id=name, prob_tumour=float(probs[i]), label=int(probs[i] >= threshold),
            entropy_bits=float(measures["entropy"][i]),
            prob_sd_tta=float(measures["tta_sd"][i]) if "tta_sd" in measures else None,
            resized_from=list(resized) if resized else None, converted_from=decoded.converted_from[i],
            overlay_png_base64=_png_base64(overlays[i]) if overlays is not None else None,
            patch_png_base64=_png_base64(decoded.patches[i]) if preview else None,
        ))
    return PredictResponse(model=str(run.config.get("model")), threshold=threshold,
                           temperature=run.temperature, tta=tta, results=results)


def create_app(run: LoadedRun, config: ServeConfig | None = None) -> FastAPI:
    """The app serving `run` (a torch model: Grad-CAM needs its gradients) within `config`'s limits."""
    run = check_run(run)
    config = config or ServeConfig()
    run.check_tta(config.tta)
    no_overlay_because = overlay_refusal(run)
    batcher = PredictionBatcher(
        lambda patches, tta: predict_samples(run, patches, tta=tta),
        lambda patches: class_activation_maps(run.model, patches, mean=run.mean, std=run.std, crop_px=run.crop_px,
                                              device=run.device, method="gradcam")[0],
        max_batch_patches=config.max_batch_patches, max_wait_ms=config.max_wait_ms,
        # --max-queued-patches is counted at the server's own --tta: a patch asking for more views counts for more.
        max_queued_views=config.max_queued_patches * config.tta, max_queued_patches=config.max_queued_patches,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    # FastAPIOffline: FastAPI whose /docs page loads Swagger UI from the package, not a
    # CDN, so that it works on a hospital network with no internet.
    app = FastAPIOffline(title="histodetect", version=__version__, lifespan=lifespan,
                  description="Metastatic tissue in 96x96 lymph-node histopathology patches (PatchCamelyon). "
                              "The web page is at /.")
    app.state.batcher = batcher
    app.add_middleware(BodySizeLimit, max_bytes=config.max_upload_bytes)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return _error(getattr(exc, "status", 400), str(exc))

    @app.exception_handler(ServerBusy)
    async def busy(request: Request, exc: ServerBusy) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{' '.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(422, f"{problems}; see /docs for the parameters")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", exc.headers)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", summary="Liveness, queue depth and batching so far")
    async def health() -> dict:
        stats = batcher.stats
        return {"status": "ok", "model": run.config.get("model"), "queued_patches": batcher.queued_patches,
                "queued_views": batcher.queued_views, "requests": stats.requests, "patches": stats.patches,
                "batches": stats.batches}

    # Load balancers and `curl -I` probe liveness with HEAD; FastAPI answers 405 to a GET-only route.
    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:
        return Response(media_type="application/json")

    @app.get("/v1/model", summary="Model card: architecture, preset, data fingerprint, validation metrics, threshold")
    async def model() -> dict:
        return model_card(run, config, no_overlay_because)

    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_REQUEST_BODY,
              summary="Score patches: multipart image files, or JSON {patches: [{id, image_base64}]}")
    async def predict(
        request: Request,
        tta: int | None = Query(None, description="test-time views averaged per patch: 1, 4 or 8 dihedral "
                                                  "views, 40 or 72 with moved crops (default: the server's --tta)"),
        overlay: bool = Query(False, description="also return a Grad-CAM overlay PNG per patch"),
        preview: bool = Query(False, description="also return each patch as scored, PNG (a TIFF's preview)"),
    ) -> PredictResponse:
        check_query(request.query_params, request.url.path, ("tta", "overlay", "preview"))
        tta = check_tta(tta, config, run.tta_choices)
        uploads = await read_uploads(request, config)
        decoded = await run_in_threadpool(decode_uploads, uploads, config)
        scored = await scored_unless_client_gone(request, batcher.submit(decoded.patches, tta, overlay))
        if scored is None:  # nobody reads this answer; 499 is nginx's "client closed request"
            return _error(499, "client closed the request before it was scored")
        return await run_in_threadpool(_results, run, decoded, scored.logits, scored.overlays, tta, preview)

    return app
