"""What a request may carry and how it becomes patches: limits, multipart and JSON bodies, decoding.

Every check here runs before any pixel is decoded or any model runs, and each
refusal is a `RequestError`: one line naming the file (or field), what was
expected, what was found and the fix, answered as JSON with a 4xx status.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import QueryParams, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..augment import TTA_VIEW_COUNTS
from ..data.decode import PATCH_SIZE_PX, decode_patch_file, tiff_size
from ..errors import UserError, check_bool, check_int, check_number


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of `histodetect serve`; every default is safe to expose on a laptop."""

    # A 96x96 uncompressed TIFF is 27.7 kB; 256 of them, base64 in JSON, are 9.5 MB.
    max_upload_bytes: int = 16 * 2**20
    max_files: int = 256  # patches in one request
    # A patch is 9,216 pixels; an image header announcing more than this is refused
    # before decoding (a small PNG can announce 50,000x50,000 pixels: 7.5 GB decoded).
    max_image_pixels: int = 1024 * 1024
    resize: bool = False  # resize images that are not 96x96 (else refuse them with 422)
    tta: int = 1  # test-time views per patch when a request does not say (TTA_VIEW_COUNTS)
    # Request batching: the model runs on up to this many queued patches at once,
    # waiting at most max_wait_ms for more to arrive after the first.
    max_batch_patches: int = 256
    max_wait_ms: float = 2.0
    # Past this many queued patches, or this much queued work, the server answers 503 (busy)
    # instead of queueing. Work is counted in patches at `tta`: one asking for more views
    # counts for more (at tta 8, a patch at 72 views counts as 9), a Grad-CAM overlay for
    # batcher.OVERLAY_VIEWS views more. The patch count bounds the queue's memory.
    max_queued_patches: int = 4096

    def __post_init__(self) -> None:
        # From Python, max_files="8" was a TypeError. numpy's numbers become Python's, for /v1/model's JSON
        # (object.__setattr__: the config is frozen).
        for name in ("max_upload_bytes", "max_files", "max_image_pixels", "tta", "max_batch_patches", "max_queued_patches"):
            object.__setattr__(self, name, check_int(f"--{name.replace('_', '-')}", getattr(self, name)))
        object.__setattr__(self, "max_wait_ms", check_number("--max-wait-ms", self.max_wait_ms))
        object.__setattr__(self, "resize", check_bool("--resize", self.resize))
        if self.tta not in TTA_VIEW_COUNTS:
            raise UserError(f"--tta {self.tta}: expected one of {', '.join(map(str, TTA_VIEW_COUNTS))}")
        for name in ("max_upload_bytes", "max_files", "max_image_pixels", "max_batch_patches", "max_queued_patches"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a positive number")
        if self.max_image_pixels < PATCH_SIZE_PX * PATCH_SIZE_PX:
            raise UserError(f"--max-image-pixels {self.max_image_pixels}: expected at least "
                            f"{PATCH_SIZE_PX * PATCH_SIZE_PX} (one 96x96 patch)")
        if self.max_queued_patches < self.max_files:
            # A request over the limit is queued only when the queue is empty, which under load may be never.
            raise UserError(f"--max-queued-patches {self.max_queued_patches}: expected at least --max-files "
                            f"{self.max_files}, or a full request at --tta would wait for an empty queue")
        if self.max_wait_ms < 0:
            raise UserError(f"--max-wait-ms {self.max_wait_ms}: expected 0 or more milliseconds")


class RequestError(UserError):
    """A mistake in an HTTP request, with the status to answer it with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """One patch image as it arrived: its name in the request and its bytes."""

    name: str
    data: bytes


@dataclass
class DecodedUploads:
    names: list[str]
    patches: np.ndarray  # (N, 96, 96, 3) uint8
    resized_from: list[tuple[int, int] | None]  # original (width, height) where resized
    converted_from: list[str | None]  # original mode where not RGB


JSON_EXAMPLE = '{"patches": [{"id": "a.png", "image_base64": "iVBORw0..."}]}'
MULTIPART = "multipart/form-data"
JSON_TYPE = "application/json"


def check_query(query: QueryParams, path: str, known: Sequence[str]) -> None:
    """Refuse a query parameter `path` does not take, or one given twice: either would be ignored silently."""
    for name in query:
        if name not in known:
            takes = " and ".join(known) if len(known) < 3 else f"{', '.join(known[:-1])} and {known[-1]}"
            raise RequestError(f"query parameter '{name}': unknown; {path} takes {takes} (see /docs)", 422)
        values = query.getlist(name)
        if len(values) > 1:
            raise RequestError(f"query parameter '{name}': given {len(values)} times ({', '.join(values)}); "
                               "give it once", 422)


def check_tta(tta: int | None, config: ServeConfig, choices: Sequence[int] = TTA_VIEW_COUNTS) -> int:
    """The request's `tta` query parameter, or the server's default; `choices` are those the run can make."""
    if tta is None:
        return config.tta
    if tta not in choices:
        raise RequestError(f"query parameter tta={tta}: expected one of {', '.join(map(str, choices))} "
                           "test-time views per patch", 422)
    return tta


def too_large_message(max_upload_bytes: int) -> str:
    return (f"request body: over the limit of {max_upload_bytes:,} bytes; send fewer patches per request "
            "or start the server with a larger --max-upload-bytes")


def _too_many_files(n: int | str, config: ServeConfig) -> RequestError:
    return RequestError(f"request: {n} patches, over the limit of {config.max_files} per request; "
                        "split them over several requests", 413)


async def read_uploads(request: Request, config: ServeConfig) -> list[Upload]:
    """The patch images of a multipart (files) or JSON (base64) request body."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == MULTIPART:
        return await _read_multipart(request, config)
    if media_type == JSON_TYPE:
        return parse_json_uploads(await request.body(), config)
    found = f"'{content_type}'" if content_type else "none"
    raise RequestError(f"Content-Type: expected {MULTIPART} (image files) or {JSON_TYPE} (base64 images), "
                       f"found {found}", 415)


async def _read_multipart(request: Request, config: ServeConfig) -> list[Upload]:
    try:
        form = await request.form(max_files=config.max_files, max_fields=config.max_files)
    except HTTPException as exc:  # starlette's answer to a multipart body it cannot parse
        if str(exc.detail).startswith("Too many files"):
            raise _too_many_files(f"more than {config.max_files}", config) from None
        raise RequestError(f"multipart body: {exc.detail} Send the patches as files in the form field 'files'") from None
    uploads = []
    try:
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(Upload(value.filename or f"{field}[{len(uploads)}]", await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise RequestError("multipart body: no files; send the patch images as files in the form field 'files'", 422)
    return uploads


def parse_json_uploads(body: bytes, config: ServeConfig) -> list[Upload]:
    """{"patches": [{"id": str (optional), "image_base64": str}, ...]} -> uploads."""
    try:
        document = json.loads(body)
    except UnicodeDecodeError as exc:  # a subclass of ValueError: caught first
        raise RequestError(f"request body: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
                           "send JSON encoded as UTF-8") from None
    # ValueError covers JSONDecodeError and integers over Python's 4,300-digit limit;
    # RecursionError, arrays nested thousands deep.
    except (ValueError, RecursionError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise RequestError(f"request body: not valid JSON{where}; expected {JSON_EXAMPLE}") from None
    if not isinstance(document, dict):
        raise RequestError(f"request body: expected an object with a list 'patches', found {_json_kind(document)}; "
                           f"send {JSON_EXAMPLE}", 422)
    patches = document.get("patches")
    if not isinstance(patches, list) or not patches:
        found = "no 'patches'" if "patches" not in document else _json_kind(patches)
        raise RequestError(f"request body: expected a non-empty list 'patches', found {found}; "
                           f"send {JSON_EXAMPLE}", 422)
    if len(patches) > config.max_files:
        raise _too_many_files(len(patches), config)
    uploads = []
    for i, item in enumerate(patches):
        where = f"patches[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("image_base64"), str):
            if not isinstance(item, dict):
                found = _json_kind(item)
            elif "image_base64" not in item:
                found = "no 'image_base64'"
            else:
                found = f"{_json_kind(item['image_base64'])} for 'image_base64'"
            raise RequestError(f"{where}: expected an object with a string 'image_base64', found {found}; "
                               f"send {JSON_EXAMPLE}", 422)
        name = item.get("id", f"patch{i}")
        if not isinstance(name, str):
            raise RequestError(f"{where}.id: expected a string, found {_json_kind(name)}", 422)
        uploads.append(Upload(name, _decode_base64(item["image_base64"], f"{where}.image_base64")))
    return uploads


def _json_kind(value: object) -> str:
    """A parsed JSON value's kind in JSON's words, for "found ..." in errors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict, str)) and not value:
        return {list: "an empty list", dict: "an empty object", str: "an empty string"}[type(value)]
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), "a number")


def _decode_base64(text: str, where: str) -> bytes:
    """Standard base64 (a data: URL prefix is allowed), strictly: any other character is an error.

    Line breaks and spaces are dropped first: `base64` and MIME wrap their output at 76 columns.
    """
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where}: not valid base64 ({exc}); encode the image file's bytes with standard base64") from None


def decode_upload(upload: Upload, config: ServeConfig) -> tuple[np.ndarray, tuple[int, int] | None, str | None]:
    """One upload -> (patch (96, 96, 3) uint8, resized_from, converted_from), or a RequestError.

    The header is read first: size limits and the 96x96 rule are checked before
    any pixel is decoded. Decoding then goes through `decode_patch_file`, the same
    code `predict` and `prepare` use, so a file scores the same here as there.
    """
    where = f"file '{upload.name}'"
    if not upload.data:
        raise RequestError(f"{where}: is empty (0 bytes); send the whole image file", 422)
    # A TIFF no Pillow mode holds (float or uint32 RGB, float64, big-endian BigTIFF): decode_patch_file
    # reads it with tifffile, so its size comes from tifffile too. Pillow is not even tried on a
    # big-endian BigTIFF: it warns "Corrupt EXIF data" trying.
    size = tiff_size(upload.data) if upload.data[:4] == b"MM\x00+" else None
    try:
        if size is None:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(upload.data)) as image:  # reads the header only
                    size = image.size
    except UnidentifiedImageError:
        size = tiff_size(upload.data)
        if size is None:
            raise RequestError(f"{where}: not an image Pillow can read; send PNG, JPEG or TIFF patches", 422) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(f"{where}: refused before decoding: {exc}", 413) from None
    except (OSError, SyntaxError, ValueError, OverflowError) as exc:  # OverflowError: a damaged TIFF tag
        raise RequestError(f"{where}: has a corrupt image header ({exc}); send the file again", 422) from None
    width, height = size
    if width * height > config.max_image_pixels:
        raise RequestError(f"{where}: is {width}x{height} pixels, over the limit of {config.max_image_pixels:,} "
                           "pixels (refused before decoding); send 96x96 patches", 413)
    if (width, height) != (PATCH_SIZE_PX, PATCH_SIZE_PX) and not config.resize:
        raise RequestError(f"{where}: is {width}x{height} pixels, expected {PATCH_SIZE_PX}x{PATCH_SIZE_PX}; "
                           "send 96x96 patches, or start the server with --resize", 422)
    # decode_patch_file takes a path; an anonymous temporary file keeps decoding in
    # one place for the CLI and the server (a 28 kB write stays in the page cache).
    with tempfile.NamedTemporaryFile(prefix="histodetect-upload-") as handle:
        handle.write(upload.data)
        handle.flush()
        decoded = decode_patch_file(Path(handle.name), resize=config.resize)
    if decoded.error is not None:
        # "send the complete file" fits a truncated upload, not values out of range or a multi-page stack.
        # tifffile's refusals say "is a truncated or corrupt TIFF (...)".
        truncated = decoded.error.startswith(("is truncated or corrupt", "is a truncated or corrupt"))
        advice = "; send the complete image file" if truncated else ""
        raise RequestError(f"{where}: {decoded.error}{advice}", 422)
    return decoded.patch, decoded.resized_from, decoded.converted_from


def decode_uploads(uploads: list[Upload], config: ServeConfig) -> DecodedUploads:
    """Decode every upload, refusing the whole request at the first bad one."""
    if len(uploads) > config.max_files:
        raise _too_many_files(len(uploads), config)
    decoded = [decode_upload(upload, config) for upload in uploads]
    return DecodedUploads(
        names=[u.name for u in uploads],
        patches=np.stack([patch for patch, _, _ in decoded]),
        resized_from=[resized for _, resized, _ in decoded],
        converted_from=[converted for _, _, converted in decoded],
    )
