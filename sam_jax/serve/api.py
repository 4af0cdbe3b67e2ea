"""The HTTP side of `sam-jax serve`: a FastAPI app over one `SegmentationService` (and, with
--annotate, its `AnnotationStore`).

    GET  /                 the page (sam_jax/serve/static/index.html)
    GET  /api/info         the model, limits, cache use and the last encoder time
    GET  /api/images       image names in the --images folder
    POST /embed            multipart `file` (an upload) or form field `name` (from --images)
                           -> {image_id, width, height, mode, name, cached, encode_seconds}
    GET  /image/{image_id} the image as the model saw it (RGB PNG)
    POST /predict          JSON prompt -> {prediction_id, masks: [COCO RLE records], decode_ms}
    POST /everything       JSON generator settings -> {records (official layout), seconds, settings}
    GET  /docs             OpenAPI documentation of all of these

With --annotate (404 without), `image` being a name in the --images folder:

    GET  /annotate/state             the images, which are done, first_open, progress, proposal settings
    GET  /annotate/image?image=      one image's saved annotations, proposal marks, progress
    GET  /annotate/proposals?image=  the generator's proposals {key, segmentation, ...}, proposal marks
    POST /annotate/accept            {image, prediction_id, index} | {image, proposal} | all four
    POST /annotate/delete            {image, id}
    POST /annotate/done              {image, done}
    POST /annotate/reject            {image, proposal, rejected}

Errors are JSON {"detail": "..."} naming the problem: 404 an unknown image or
name, 413 an upload over the limits, 415 a file that is not a usable image,
422 a malformed or impossible request (the field named). The model runs in
FastAPI's worker threads, so the event loop keeps answering while it does.
"""

from __future__ import annotations

import importlib.resources
import io
import logging
from typing import Annotated, Literal, Optional

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sam_jax.serve.annotations import AnnotationStore
from sam_jax.serve.service import EVERYTHING_DEFAULTS, RequestError, SegmentationService

STATIC = importlib.resources.files("sam_jax.serve") / "static"
MAX_POINTS = 64  # per prompt; each bucket of point counts compiles the decoder once

log = logging.getLogger("sam_jax.serve")

Number = Annotated[float, Field(allow_inf_nan=False)]


class MaskInput(BaseModel):
    """An earlier prediction's low-res logits, fed back as a dense prompt."""

    model_config = ConfigDict(extra="forbid")
    prediction_id: str = Field(description="`prediction_id` of an earlier /predict on the same image")
    index: int = Field(ge=0, description="which of its masks")


class PredictRequest(BaseModel):
    """One prompt, in pixels of the original image (as `SamPredictor.predict` takes it)."""

    model_config = ConfigDict(extra="forbid")
    image_id: str
    point_coords: Optional[list[tuple[Number, Number]]] = Field(
        None, max_length=MAX_POINTS, description="[[x, y], ...]")
    point_labels: Optional[list[Literal[0, 1]]] = Field(
        None, max_length=MAX_POINTS, description="1 foreground, 0 background, one per point")
    box: Optional[tuple[Number, Number, Number, Number]] = Field(None, description="[x0, y0, x1, y1]")
    mask_input: Optional[MaskInput] = None
    multimask_output: bool = True
    store_logits: bool = Field(True, description="keep the low-res logits for a later mask_input "
                                                "(false for previews: prediction_id is then null)")


class EverythingRequest(BaseModel):
    """`SamAutomaticMaskGenerator` settings (official defaults where left out)."""

    model_config = ConfigDict(extra="forbid")
    image_id: str
    points_per_side: Optional[int] = Field(None, ge=1, le=128)
    pred_iou_thresh: Optional[Number] = None
    stability_score_thresh: Optional[Number] = None
    stability_score_offset: Optional[Number] = Field(None, ge=0)
    box_nms_thresh: Optional[Number] = Field(None, ge=0, le=1)
    crop_n_layers: Optional[int] = Field(None, ge=0, le=3)
    min_mask_region_area: Optional[int] = Field(None, ge=0)


class AcceptRequest(BaseModel):
    """A mask to save: a prediction's (prediction_id + index), a proposal as it is (proposal),
    or a prediction that fixes a proposal (all three)."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="the image's name in the --images folder")
    prediction_id: Optional[str] = None
    index: Optional[int] = Field(None, ge=0, description="which of the prediction's masks")
    proposal: Optional[str] = Field(None, description="a proposal's `key`")


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    id: int = Field(description="the annotation's id")


class DoneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    done: bool = True


class RejectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    proposal: str = Field(description="a proposal's `key`")
    rejected: bool = Field(True, description="false takes the mark back")


def create_app(service: SegmentationService, annotations: Optional[AnnotationStore] = None) -> FastAPI:
    app = FastAPI(title="sam-jax serve", description=__doc__.split("\n\n")[0], version="1")
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    upload_slack = 64 * 1024  # multipart headers around the file

    @app.exception_handler(RequestError)
    def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        lines = [f"body is not valid JSON (at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', e['msg'])})"
                 if e["type"] == "json_invalid" else
                 f"{'.'.join(str(part) for part in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors]
        return JSONResponse({"detail": "; ".join(lines),
                             "errors": [{"loc": list(e["loc"]), "msg": e["msg"]} for e in errors]},
                            status_code=422)

    @app.exception_handler(Exception)
    def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    @app.middleware("http")
    async def refuse_oversized_uploads(request: Request, call_next):
        """A body over the upload limit is refused from its Content-Length, before it is read."""
        length = request.headers.get("content-length", "")
        if request.url.path == "/embed" and length.isdigit() and \
                int(length) > service.max_upload_bytes + upload_slack:
            return JSONResponse({"detail": f"upload of {int(length):,} bytes is over the "
                                           f"{service.max_upload_bytes:,}-byte limit"}, status_code=413)
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/api/info")
    def info() -> dict:
        config = service.model.config
        return {"model_type": config.name, "image_size": config.image_size,
                "images_folder": service.images_folder is not None,
                "max_upload_bytes": service.max_upload_bytes, "max_image_pixels": service.max_image_pixels,
                "cache": {"entries": len(service.embeddings), "bytes": service.embeddings.nbytes,
                          "max_bytes": service.embeddings.max_bytes},
                "last_encode_seconds": service.last_encode_seconds, "decoder_warm": service.decoder_warm,
                "everything_defaults": EVERYTHING_DEFAULTS, "annotate": annotations is not None}

    @app.get("/api/images")
    def images() -> dict:
        return {"images": service.list_images()}

    @app.post("/embed")
    def embed(file: Optional[UploadFile] = File(None, description="an image file"),
              name: Optional[str] = Form(None, description="an image in the --images folder")) -> dict:
        """Embeds an image (once per content); returns its `image_id` for /predict and /everything."""
        if (file is None) == (name is None):
            raise RequestError(422, "give exactly one of `file` (an upload) or `name` (an image in --images)")
        if file is not None:
            name = file.filename or "upload"
            entry, computed = service.embed_upload(file.file.read(service.max_upload_bytes + 1), name)
        else:
            entry, computed = service.embed_folder_image(name)
        h, w = entry.original_size
        return {"image_id": entry.image_id, "width": w, "height": h, "mode": entry.mode, "name": name,
                "cached": not computed, "encode_seconds": entry.encode_seconds}

    @app.get("/image/{image_id}", responses={200: {"content": {"image/png": {}}}})
    def image(image_id: str) -> Response:
        buffer = io.BytesIO()
        Image.fromarray(service.image(image_id).image).save(buffer, format="PNG", compress_level=1)
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "private"})

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict:
        """Masks for one prompt; feed `prediction_id` back as `mask_input` to refine."""
        mask_input = None if request.mask_input is None else (
            request.mask_input.prediction_id, request.mask_input.index)
        return service.predict(request.image_id, request.point_coords, request.point_labels, request.box,
                               mask_input, request.multimask_output, request.store_logits)

    @app.post("/everything")
    def everything(request: EverythingRequest) -> dict:
        """The automatic mask generator on the image (official record layout, COCO RLE)."""
        return service.everything(request.image_id, **request.model_dump(exclude={"image_id"}))

    def store() -> AnnotationStore:
        if annotations is None:
            raise RequestError(404, "the server was started without --annotate: there is nothing to annotate")
        return annotations

    @app.get("/annotate/state")
    def annotate_state() -> dict:
        return store().summary()

    @app.get("/annotate/image")
    def annotate_image(image: str) -> dict:
        return store().image_state(image)

    @app.get("/annotate/proposals")
    def annotate_proposals(image: str) -> dict:
        """The automatic mask generator's proposals for the image (the server's settings)."""
        return store().proposals(image)

    @app.post("/annotate/accept")
    def annotate_accept(request: AcceptRequest) -> dict:
        """Saves a mask into the image's SA-1B JSON; returns it and the image's state."""
        return store().accept(request.image, request.prediction_id, request.index, request.proposal)

    @app.post("/annotate/delete")
    def annotate_delete(request: DeleteRequest) -> dict:
        return store().delete(request.image, request.id)

    @app.post("/annotate/done")
    def annotate_done(request: DoneRequest) -> dict:
        return store().set_done(request.image, request.done)

    @app.post("/annotate/reject")
    def annotate_reject(request: RejectRequest) -> dict:
        return store().reject(request.image, request.proposal, request.rejected)

    return app
