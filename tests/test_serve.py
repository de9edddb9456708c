"""The web service: API answers equal predict's, bad input gets a 4xx naming the problem, batching, the page."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import csv
import gc
import io
import logging
import queue
import re
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import warnings
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode

from histodetect.data.decode import decode_patch_file
from histodetect.data.store import prepare
from histodetect.errors import UserError
from histodetect.explain import render_overlays
from histodetect.predict import load_run, predict_logits, predict_patches, predict_samples, predict_to_csv
from histodetect.serve import ServeConfig, create_app, serve_run
from histodetect.serve.batcher import PredictionBatcher, ServerBusy
from histodetect.train import fit, preset_config
from conftest import PooledColour, calibrated_copy, copy_patches

# Small and fast: one epoch of 4 steps gives weights whose probabilities differ per patch.
TINY = dict(model="histo_tinynet", batch_size=32, epochs=1, max_minutes=0.0, crop_px=48, shift_px=2,
            val_batch_size=128, device="cpu", ema_decay=0.9, warmup_fraction=0.1)




@pytest.fixture(scope="module")
def trained_run(pcam_jpeg, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    copy_patches(pcam_jpeg, root / "src", {"train": 64, "valid": 32})
    prepare(root / "src", root / "store", progress=False)
    fit(preset_config("cpu", **TINY), root / "store", root / "run", preset="cpu", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def run(trained_run):
    return load_run(trained_run, device="cpu")


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run)) as client:
        yield client


@pytest.fixture(scope="module")
def strict_client(run):
    """The same model behind small limits: 4 files, 64 kB, no resizing."""
    with TestClient(create_app(run, ServeConfig(max_files=4, max_upload_bytes=64_000))) as client:
        yield client


@pytest.fixture(scope="module")
def patch_files(pcam_jpeg) -> list[Path]:
    """12 real JPEG patches from PCam's valid split, both classes."""
    return sorted((pcam_jpeg / "valid" / "1").glob("*.jpg"))[:6] + sorted((pcam_jpeg / "valid" / "0").glob("*.jpg"))[:6]


def multipart(paths: list[Path]) -> list[tuple]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def as_json(paths: list[Path]) -> dict:
    return {"patches": [{"id": p.name, "image_base64": base64.b64encode(p.read_bytes()).decode()} for p in paths]}


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header announces width x height RGB pixels (its pixel data is one zero row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_still_serving(client: TestClient, patch_file: Path) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/predict", files=multipart([patch_file])).status_code == 200


# --- answers ---------------------------------------------------------------------------------


def test_health_model_card_and_openapi_docs(client, trained_run):
    assert client.get("/health").json()["status"] == "ok"
    head = client.head("/health")  # load balancers and `curl -I` probe with HEAD: it answered 405
    assert head.status_code == 200 and head.content == b""
    card = client.get("/v1/model").json()
    run_json = load_run(trained_run, device="cpu").run
    assert card["architecture"] == "histo_tinynet" and card["preset"] == "cpu"
    assert card["data"]["fingerprint"] == run_json["data"]["fingerprint"]
    assert card["threshold"] == pytest.approx(run_json["threshold"]) and card["calibration"]["temperature"] == 1.0
    assert card["validation"]["best_epoch"]["epoch"] == 1
    assert card["validation"]["best_epoch"]["val_auc"] == pytest.approx(run_json["best_val_auc"], abs=1e-6)
    assert card["preprocessing"]["crop_px"] == 48
    assert card["serving"]["max_files"] == ServeConfig().max_files
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    docs = client.get("/docs").text
    assert "swagger-ui" in docs.lower() and "cdn." not in docs and "https://" not in docs, "works offline"
    script = re.search(r'src="([^"]*swagger-ui-bundle\.js)"', docs).group(1)
    assert client.get(script).status_code == 200 and len(client.get(script).content) > 100_000


def test_multipart_probabilities_equal_predicts_csv_for_the_same_files(client, run, patch_files, kaggle_sample, tmp_path):
    files = patch_files + sorted((kaggle_sample / "test").glob("*.tif"))[:4]
    response = client.post("/v1/predict", files=multipart(files))
    assert response.status_code == 200
    body = response.json()
    results = body["results"]
    assert [r["id"] for r in results] == [f.name for f in files]
    predict_to_csv(run, files, tmp_path / "predict.csv", progress=False)
    with (tmp_path / "predict.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    np.testing.assert_allclose([r["prob_tumour"] for r in results], [float(r["prob"]) for r in rows], atol=1e-6)
    assert [r["label"] for r in results] == [int(r["pred"]) for r in rows]
    probs = np.array([r["prob_tumour"] for r in results])
    assert probs.std() > 0, "the patches score differently"
    assert body["threshold"] == pytest.approx(run.threshold) and body["tta"] == 1
    for r in results:
        p = np.clip(r["prob_tumour"], 1e-12, 1 - 1e-12)
        assert r["entropy_bits"] == pytest.approx(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)), abs=1e-9)
        assert r["prob_sd_tta"] is None and r["overlay_png_base64"] is None


def test_the_model_cards_threshold_is_the_one_the_server_decides_with_at_its_tta(run, patch_files):
    # Served with --tta 8, the card (and the page's header) gave the 1-view threshold while every label used 8's.
    with TestClient(create_app(run, ServeConfig(tta=8))) as client:
        card = client.get("/v1/model").json()
        answer = client.post("/v1/predict", files=multipart(patch_files)).json()
    assert run.threshold_for(8) != run.threshold, "the test run chose another threshold for 8 views"
    assert answer["tta"] == 8 and card["threshold"] == pytest.approx(answer["threshold"])
    assert card["threshold"] == pytest.approx(run.threshold_for(8))
    assert card["thresholds_by_tta"]["1"] == pytest.approx(run.threshold)


def test_base64_json_answers_the_same_as_multipart_and_tta_adds_a_spread(client, run, patch_files):
    answer = client.post("/v1/predict?tta=8", files=multipart(patch_files)).json()
    by_files = answer["results"]
    by_json = client.post("/v1/predict?tta=8", json=as_json(patch_files)).json()["results"]
    assert answer["threshold"] == pytest.approx(run.threshold_for(8))  # the threshold chosen for 8 views
    assert all(r["label"] == int(r["prob_tumour"] >= answer["threshold"]) for r in by_files)
    assert [r["id"] for r in by_json] == [p.name for p in patch_files]
    np.testing.assert_allclose([r["prob_tumour"] for r in by_json], [r["prob_tumour"] for r in by_files], atol=1e-9)
    patches = np.stack([decode_patch_file(p).patch for p in patch_files])
    np.testing.assert_allclose([r["prob_tumour"] for r in by_json], predict_patches(run, patches, tta=8), atol=1e-5)
    assert all(r["prob_sd_tta"] > 0 for r in by_json)


def test_a_calibrated_run_serves_its_temperature_scaled_probabilities(trained_run, patch_files, tmp_path):
    calibrated = calibrated_copy(trained_run, tmp_path / "calibrated", temperature=2.5)
    run = load_run(calibrated, device="cpu")
    assert run.temperature == 2.5
    with TestClient(create_app(run)) as client:
        body = client.post("/v1/predict?tta=8", files=multipart(patch_files)).json()
        assert client.get("/v1/model").json()["calibration"]["temperature"] == 2.5
    assert body["temperature"] == 2.5
    probs = np.array([r["prob_tumour"] for r in body["results"]])
    logits = predict_logits(run, np.stack([decode_patch_file(p).patch for p in patch_files]), tta=8)  # (N, 8)
    np.testing.assert_allclose(probs, (1 / (1 + np.exp(-logits / 2.5))).mean(axis=1), atol=1e-5)
    uncalibrated = (1 / (1 + np.exp(-logits))).mean(axis=1)
    assert np.abs(probs - uncalibrated).max() > 1e-3, "the temperature moves these patches' probabilities"


def test_moved_crop_tta_is_offered_and_served_for_a_run_trained_on_a_shifted_crop(client, run, patch_files):
    card = client.get("/v1/model").json()
    assert card["serving"]["tta_choices"] == [1, 4, 8, 40, 72]
    answer = client.post("/v1/predict?tta=72", files=multipart(patch_files)).json()
    patches = np.stack([decode_patch_file(p).patch for p in patch_files])
    np.testing.assert_allclose([r["prob_tumour"] for r in answer["results"]], predict_patches(run, patches, tta=72),
                               atol=1e-5)
    assert answer["threshold"] == pytest.approx(run.threshold_for(72)) and answer["tta"] == 72


def test_a_data_url_is_accepted_as_base64(client, patch_files):
    data_url = "data:image/jpeg;base64," + base64.b64encode(patch_files[0].read_bytes()).decode()
    response = client.post("/v1/predict", json={"patches": [{"image_base64": data_url}]})
    assert response.status_code == 200 and response.json()["results"][0]["id"] == "patch0"


def test_base64_wrapped_at_76_columns_is_accepted(client, patch_files):
    """`base64` and MIME wrap their output; the line breaks are not part of the data."""
    import textwrap

    wrapped = "\n".join(textwrap.wrap(base64.b64encode(patch_files[0].read_bytes()).decode(), 76))
    response = client.post("/v1/predict", json={"patches": [{"image_base64": wrapped}]})
    assert response.status_code == 200, response.text


def test_overlay_returns_a_grad_cam_png_per_patch(client, patch_files):
    response = client.post("/v1/predict?overlay=true", files=multipart(patch_files[:3]))
    assert response.status_code == 200
    for result in response.json()["results"]:
        overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_png_base64"])))
        assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size[0] == overlay.size[1] >= 96



def test_preview_returns_each_patch_as_scored_so_a_tiff_can_be_shown(client, kaggle_sample):
    # Browsers do not display TIFF, and Kaggle's patches are all TIFF: the page showed "no preview" for each.
    tiffs = sorted((kaggle_sample / "test").glob("*.tif"))[:2]
    response = client.post("/v1/predict?preview=true", files=multipart(tiffs))
    assert response.status_code == 200, response.text
    for path, result in zip(tiffs, response.json()["results"]):
        shown = Image.open(io.BytesIO(base64.b64decode(result["patch_png_base64"])))
        assert shown.format == "PNG"
        np.testing.assert_array_equal(np.asarray(shown), decode_patch_file(path).patch)
    assert client.post("/v1/predict", files=multipart(tiffs)).json()["results"][0]["patch_png_base64"] is None

def test_an_overlay_prints_the_probability_of_the_requests_views(client, patch_files, monkeypatch):
    import histodetect.serve.app as app_module

    printed = []

    def recording(patches, cams, probs):
        printed.extend(np.asarray(probs).tolist())
        return render_overlays(patches, cams, probs)

    monkeypatch.setattr(app_module, "render_overlays", recording)
    response = client.post("/v1/predict?overlay=true&tta=8", files=multipart(patch_files[:3]))
    assert response.status_code == 200
    np.testing.assert_allclose(printed, [r["prob_tumour"] for r in response.json()["results"]], atol=1e-12)


def test_resize_mode_scores_other_sizes_and_says_so(run, patch_files):
    pixels = np.asarray(Image.open(patch_files[0]).convert("RGB").resize((120, 80)))
    with TestClient(create_app(run, ServeConfig(resize=True))) as resizing:
        response = resizing.post("/v1/predict", files=[("files", ("wide.png", png_bytes(pixels), "image/png"))])
    assert response.status_code == 200
    assert response.json()["results"][0]["resized_from"] == [120, 80]


def test_grayscale_patches_are_converted_and_say_so(client, patch_files):
    gray = np.asarray(Image.open(patch_files[0]).convert("L"))
    response = client.post("/v1/predict", files=[("files", ("gray.png", png_bytes(gray), "image/png"))])
    assert response.status_code == 200 and response.json()["results"][0]["converted_from"] == "L"


def test_tiffs_pillow_cannot_open_score_as_predict_scores_them(client, run, patch_files, tmp_path):
    # The header was read with Pillow first, so a float RGB or big-endian BigTIFF that predict and
    # prepare decode (through tifffile) got a 422 here; and every refusal ended "send the complete image file".
    import tifffile

    rgb = np.asarray(Image.open(patch_files[0]).convert("RGB"))
    kinds = {"float.tif": {"data": rgb.astype(np.float32) / 255},
             "bigtiff.tif": {"data": rgb, "bigtiff": True, "byteorder": ">"}}
    files = []
    for name, kind in kinds.items():
        tifffile.imwrite(tmp_path / name, kind.pop("data"), photometric="rgb", **kind)
        files.append(tmp_path / name)
    response = client.post("/v1/predict", files=multipart(files))
    assert response.status_code == 200, response.text
    expected = predict_patches(run, np.stack([decode_patch_file(f).patch for f in files]))
    np.testing.assert_allclose([r["prob_tumour"] for r in response.json()["results"]], expected, atol=1e-6)
    np.testing.assert_array_equal(decode_patch_file(files[0]).patch, rgb)  # 0-1 floats times 255, rounded
    tifffile.imwrite(tmp_path / "nan.tif", np.full((96, 96, 3), np.nan, np.float32), photometric="rgb")
    refused = client.post("/v1/predict", files=multipart([tmp_path / "nan.tif"]))
    assert refused.status_code == 422 and refused.json()["error"] == (
        "file 'nan.tif': has NaN or infinite float32 values; expected finite values in 0-1, 0-255 or 0-65535")


def test_a_truncated_tiff_read_by_tifffile_is_told_to_be_sent_whole(patch_files):
    # tifffile's refusal reads "is a truncated or corrupt TIFF (...)": the advice looked for "is truncated".
    import tifffile

    from histodetect.serve.inputs import RequestError, Upload, decode_upload

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.asarray(Image.open(patch_files[0]).convert("RGB")).astype(np.uint16) * 257,
                     photometric="rgb")
    data = buffer.getvalue()
    with pytest.raises(RequestError, match=r"^file 'cut.tif': is a truncated or corrupt TIFF \(.*\); "
                                           r"send the complete image file$") as caught:
        decode_upload(Upload("cut.tif", data[: len(data) // 2]), ServeConfig())
    assert caught.value.status == 422


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM and os.kill to self are POSIX")
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_serve_with_the_exit_status_of_every_command(trained_run, monkeypatch, capsys,
                                                                          signal_name):
    """uvicorn shuts down on either signal, then raises it again; uvicorn.run caught the KeyboardInterrupt
    that made, and `histodetect serve` stopped by Ctrl-C or a scheduler's SIGTERM exited 0."""
    import uvicorn.server

    from histodetect.cli import main

    number = getattr(signal, signal_name)
    real_startup = uvicorn.server.Server.startup

    async def startup_then_signal(self, *args, **kwargs):
        await real_startup(self, *args, **kwargs)
        os.kill(os.getpid(), number)  # once serving, as Ctrl-C or a scheduler

    monkeypatch.setattr(uvicorn.server.Server, "startup", startup_then_signal)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["serve", str(trained_run), "--port", str(_free_port())]) == 128 + number
    assert capsys.readouterr().err.splitlines()[-1] == "histodetect: interrupted"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_serve_run_binds_loopback_unless_told_and_warns_beyond_it(trained_run, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    serve_run(trained_run, port=_free_port())
    assert calls[-1]["host"] == "127.0.0.1"
    port = _free_port()
    with pytest.warns(UserWarning, match="--host 0.0.0.0: serving beyond this machine, without authentication"):
        serve_run(trained_run, host="0.0.0.0", port=port)
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == port
    with pytest.raises(UserError, match="not a run folder"):
        serve_run(trained_run.parent / "missing", port=_free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"--host 127.0.0.1 --port {busy}: cannot listen there .* choose another"):
            serve_run(trained_run, port=busy)
    with pytest.raises(UserError, match=r"--port 99999: expected a port number in 1-65535"):
        serve_run(trained_run, port=99999)
    with pytest.raises(UserError, match=r"--threads -1: expected a count in \[0, 1024\]"):
        serve_run(trained_run, port=_free_port(), threads=-1)
    with pytest.raises(UserError, match=r"--threads 9223372036854775808: expected a count in \[0, 1024\]"):
        serve_run(trained_run, port=_free_port(), threads=2**63)  # was a traceback from torch
    assert len(calls) == 2, "nothing served on a busy port, a port out of range or a thread count out of range"


def test_a_host_or_port_that_cannot_be_bound_gets_the_fix_for_its_cause(trained_run, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("served on a port it cannot bind"))
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine
    with pytest.raises(UserError, match=r"--host 192.0.2.1 --port \d+: cannot listen there \(.*\); "
                                        r"not an address of this machine; use 127.0.0.1 .* or 0.0.0.0") as error:
        serve_run(trained_run, host="192.0.2.1", port=_free_port())
    assert "another server" not in str(error.value)

    def refused(sock, address):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refused)  # what a user who is not root gets for port 80
    with pytest.raises(UserError, match=r"--port 80: cannot listen there \(Permission denied\); ports below 1024 "
                                        r"need administrator rights; choose one above 1023 with --port"):
        serve_run(trained_run, port=80)
    with pytest.raises(UserError, match=r"--port 0: expected a port number in 1-65535"):
        serve_run(trained_run, port=0)  # uvicorn would pick a port, and the printed address would say :0


def test_the_printed_address_can_be_opened_and_only_other_machines_get_the_warning(trained_run, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    monkeypatch.setattr("histodetect.serve._check_port_free", lambda host, port: None)  # ::1 may be off here
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 127.0.0.2 is this machine too: no warning
        serve_run(trained_run, host="::1", port=8123)
        serve_run(trained_run, host="127.0.0.2", port=8124)
    printed = capsys.readouterr().out
    assert "http://[::1]:8123/" in printed and "http://127.0.0.2:8124/" in printed


# --- bad input: a 4xx with a JSON error naming the problem, and the server keeps serving ------


def _bad_requests(patch: Path) -> list[tuple[str, dict, int, str]]:
    jpeg = patch.read_bytes()
    wide = np.zeros((80, 120, 3), np.uint8)
    return [
        ("non-image file", dict(files=[("files", ("notes.txt", b"these are not pixels", "text/plain"))]),
         422, "file 'notes.txt': not an image Pillow can read"),
        ("truncated image", dict(files=[("files", ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"))]),
         422, "file 'cut.jpg': is truncated or corrupt"),
        ("image header only", dict(files=[("files", ("head.jpg", jpeg[:300], "image/jpeg"))]),
         422, "file 'head.jpg'"),
        ("not 96x96", dict(files=[("files", ("wide.png", png_bytes(wide), "image/png"))]),
         422, "file 'wide.png': is 120x80 pixels, expected 96x96; send 96x96 patches, or start the server with --resize"),
        ("decompression bomb, decodable", dict(files=[("files", ("bomb.png", png_bytes(np.zeros((2000, 2000), np.uint8)), "image/png"))]),
         413, "file 'bomb.png': is 2000x2000 pixels, over the limit of 1,048,576 pixels (refused before decoding)"),
        ("decompression bomb, 2.5 gigapixels", dict(files=[("files", ("huge.png", png_claiming(50_000, 50_000), "image/png"))]),
         413, "file 'huge.png': refused before decoding"),
        ("empty file", dict(files=[("files", ("empty.png", b"", "image/png"))]), 422, "file 'empty.png': is empty"),
        ("wrong content type", dict(content=jpeg, headers={"content-type": "image/jpeg"}),
         415, "Content-Type: expected multipart/form-data (image files) or application/json (base64 images), found 'image/jpeg'"),
        ("no content type", dict(content=b""), 415, "found none"),
        ("malformed JSON", dict(content=b'{"patches": [', headers={"content-type": "application/json"}),
         400, "request body: not valid JSON at line 1 column 14"),
        ("JSON with a 5,000-digit number", dict(content=b'{"patches": ' + b"1" * 5000 + b"}",
                                                headers={"content-type": "application/json"}),
         400, "request body: not valid JSON"),
        ("JSON nested 100,000 deep", dict(content=b"[" * 100_000 + b"]" * 100_000,
                                          headers={"content-type": "application/json"}),
         400, "request body: not valid JSON"),
        ("JSON without patches", dict(json={"images": []}), 422, "request body: expected a non-empty list 'patches', found no 'patches'"),
        ("JSON with a number for an image", dict(json={"patches": [{"image_base64": 7}]}),
         422, "patches[0]: expected an object with a string 'image_base64'"),
        ("malformed base64", dict(json={"patches": [{"id": "x", "image_base64": "not*base64!"}]}),
         400, "patches[0].image_base64: not valid base64"),
        ("base64 of a non-image", dict(json={"patches": [{"id": "x.png", "image_base64": base64.b64encode(b"hello").decode()}]}),
         422, "file 'x.png': not an image"),
        ("multipart without files", dict(content=b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue\r\n--b--\r\n",
             headers={"content-type": "multipart/form-data; boundary=b"}),
         422, "multipart body: no files"),
        ("multipart without a boundary", dict(content=b"xx", headers={"content-type": "multipart/form-data"}),
         400, "multipart body: Missing boundary in multipart."),
        ("a TTA that does not exist", dict(files=[("files", ("p.jpg", jpeg, "image/jpeg"))], params={"tta": 3}),
         422, "query parameter tta=3: expected one of 1, 4, 8"),
        ("a TTA that is not a number", dict(files=[("files", ("p.jpg", jpeg, "image/jpeg"))], params={"tta": "many"}),
         422, "query tta: Input should be a valid integer"),
    ]


def test_each_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(client, patch_files):
    for name, request, status, message in _bad_requests(patch_files[0]):
        response = client.post("/v1/predict", **request)
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"] == "application/json", name
        assert message in response.json()["error"], (name, response.json())
        assert_still_serving(client, patch_files[1])


def test_an_upload_over_the_size_limit_gets_413_whether_its_length_is_declared_or_streamed(strict_client, patch_files):
    big = patch_files[0].read_bytes() * 20  # ~100 kB against a 64 kB limit
    declared = strict_client.post("/v1/predict", files=[("files", ("big.jpg", big, "image/jpeg"))])
    assert declared.status_code == 413
    assert declared.json()["error"].startswith("request body: over the limit of 64,000 bytes")

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        yield b'{"patches": [{"image_base64": "'
        for _ in range(100):
            yield b"A" * 1000
        yield b'"}]}'

    streamed = strict_client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "over the limit of 64,000 bytes" in streamed.json()["error"]
    assert_still_serving(strict_client, patch_files[1])


def test_too_many_files_in_one_request_gets_413(strict_client, patch_files):
    response = strict_client.post("/v1/predict", files=multipart(patch_files[:5]))
    assert response.status_code == 413
    assert response.json()["error"] == ("request: more than 4 patches, over the limit of 4 per request; "
                                        "split them over several requests")
    response = strict_client.post("/v1/predict", json=as_json(patch_files[:5]))
    assert response.status_code == 413 and "request: 5 patches, over the limit of 4" in response.json()["error"]
    assert strict_client.post("/v1/predict", files=multipart(patch_files[:4])).status_code == 200


def test_unknown_paths_and_methods_answer_json_errors(client):
    assert client.get("/v2/nothing").json() == {"error": "GET /v2/nothing: Not Found"}
    response = client.get("/v1/predict")
    assert response.status_code == 405 and "Method Not Allowed" in response.json()["error"]


def test_unknown_or_repeated_query_parameters_are_refused_not_ignored(client, patch_files):
    files = multipart(patch_files[:1])
    for query, message in [
        ({"threshold": "0.3"}, "query parameter 'threshold': unknown; /v1/predict takes tta, overlay and preview (see /docs)"),
        ({"overlays": "true"}, "query parameter 'overlays': unknown; /v1/predict takes tta, overlay and preview (see /docs)"),
        ([("tta", "4"), ("tta", "8")], "query parameter 'tta': given 2 times (4, 8); give it once"),
    ]:
        response = client.post("/v1/predict", files=files, params=query)
        assert response.status_code == 422 and response.json()["error"] == message, (query, response.text)
        assert_still_serving(client, patch_files[1])
    assert client.post("/v1/predict", files=files, params={"tta": 4, "overlay": "false"}).status_code == 200


def test_json_body_errors_say_what_was_found(client):
    for body, message in [
        (b'{"patches": []}', "expected a non-empty list 'patches', found an empty list"),
        (b'[{"image_base64": "AAAA"}]', "expected an object with a list 'patches', found a list"),
        (b'{"patches": {"a": 1}}', "expected a non-empty list 'patches', found an object"),
        (b'{"patches": [null]}', "patches[0]: expected an object with a string 'image_base64', found null"),
        (b'{"patches": [{"id": "a.png"}]}', "patches[0]: expected an object with a string 'image_base64', found no"),
        (b'{"patches": [{"image_base64": 7}]}', "found a number for 'image_base64'"),
        (b'{"patches": [{"id": 5, "image_base64": "AAAA"}]}', "patches[0].id: expected a string, found a number"),
        ('{"patches": [{"id": "caf\xe9"}]}'.encode("latin-1"),
         "request body: not UTF-8 (byte 0xe9 at position 24); send JSON encoded as UTF-8"),
    ]:
        response = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500 and message in response.json()["error"], (body, response.text)


def test_bad_server_limits_are_user_errors():
    with pytest.raises(UserError, match="--tta 2: expected one of 1, 4, 8"):
        ServeConfig(tta=2)
    with pytest.raises(UserError, match="--max-image-pixels 100: expected at least 9216"):
        ServeConfig(max_image_pixels=100)
    with pytest.raises(UserError, match="--max-queued-patches 10: expected at least --max-files 256"):
        ServeConfig(max_queued_patches=10)


# --- fuzzing: no input makes the server fail (5xx) --------------------------------------------


@pytest.fixture(scope="module")
def api_schema(run):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(run, ServeConfig(max_files=8)))


# schemathesis' own pytest plugin (schema.parametrize) does not run under pytest 9 yet
# (it reads Function._nodeid); its hypothesis strategies do. Negative cases (data
# that breaks the schema) exist only where there are parameters or a body.
@pytest.mark.parametrize("method, path, mode", [
    ("GET", "/health", GenerationMode.POSITIVE),
    ("GET", "/v1/model", GenerationMode.POSITIVE),
    ("POST", "/v1/predict", GenerationMode.POSITIVE),
    ("POST", "/v1/predict", GenerationMode.NEGATIVE),
])
def test_fuzzed_requests_never_get_a_server_error(api_schema, method, path, mode):
    documented = {(result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()}
    assert documented == {("GET", "/health"), ("GET", "/v1/model"), ("POST", "/v1/predict")}

    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call()
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            assert response.json()["error"]

    check()


@given(cut=st.integers(min_value=0, max_value=4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
       kind=st.sampled_from(["jpg", "tif"]))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_damaged_real_images_get_200_or_a_4xx_never_a_5xx(client, patch_files, kaggle_sample, cut, flips, kind):
    source = patch_files[0] if kind == "jpg" else min((kaggle_sample / "train").glob("*.tif"))
    data = bytearray(source.read_bytes())
    for at, value in flips:
        data[at % len(data)] = value
    data = bytes(data[: len(data) - cut])
    response = client.post("/v1/predict", files=[("files", (f"damaged.{kind}", data, "application/octet-stream"))])
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    if response.status_code != 200:
        assert "damaged" in response.json()["error"]


# --- request batching ------------------------------------------------------------------------


def test_concurrent_requests_are_batched_into_one_model_call_with_the_same_answers(run, patch_files):
    patches = np.stack([decode_patch_file(p).patch for p in patch_files])
    calls: list[int] = []
    release = threading.Event()

    def score(batch: np.ndarray, tta: int) -> np.ndarray:
        calls.append(len(batch))
        release.wait(timeout=60)  # hold the first call so that the rest queue up behind it
        return predict_samples(run, batch, tta=tta)

    batcher = PredictionBatcher(score, lambda batch: batch, max_batch_patches=256, max_wait_ms=0,
                                max_queued_views=1024)
    batcher.start()
    try:
        first = batcher.submit(patches[:1], tta=1)
        while not calls:
            time.sleep(0.01)
        futures = [batcher.submit(patches[i : i + 1], tta=1) for i in range(1, len(patches))]
        release.set()
        results = [f.result(timeout=60) for f in [first, *futures]]
    finally:
        batcher.stop()
    assert calls == [1, len(patches) - 1], "the 11 requests queued behind the first ran as one batch"
    assert batcher.stats.batches == 2 and batcher.stats.requests == len(patches)
    logits = np.concatenate([r.logits for r in results])
    np.testing.assert_allclose(logits, predict_samples(run, patches, tta=1), atol=1e-5)


def test_requests_with_other_tta_or_overlays_share_a_batch_but_get_their_own_answers(run, patch_files):
    patches = np.stack([decode_patch_file(p).patch for p in patch_files[:4]])
    release, scoring = threading.Event(), threading.Event()

    def score(batch: np.ndarray, tta: int) -> np.ndarray:
        scoring.set()
        release.wait(timeout=60)  # hold the first call so that the rest queue up behind it
        return predict_samples(run, batch, tta=tta)

    batcher = PredictionBatcher(score, lambda batch: batch[:, :2, :2] + 1, max_batch_patches=256, max_wait_ms=0,
                                max_queued_views=1024)
    batcher.start()
    try:
        blocker = batcher.submit(patches[:1], tta=1)
        assert scoring.wait(timeout=60)
        plain = batcher.submit(patches[:2], tta=1)
        views = batcher.submit(patches[2:], tta=8, overlay=True)
        with_overlay = batcher.submit(patches[:2], tta=1, overlay=True)
        other_overlay = batcher.submit(patches[2:], tta=1, overlay=True)  # same tta: the same model call
        release.set()
        blocker.result(timeout=60)
        plain, views = plain.result(timeout=60), views.result(timeout=60)
        with_overlay, other_overlay = with_overlay.result(timeout=60), other_overlay.result(timeout=60)
    finally:
        batcher.stop()
    assert batcher.stats.batches == 3, "the blocker, then one model call per tta for the other four requests"
    assert plain.logits.shape == (2, 1, 1) and plain.overlays is None
    assert views.logits.shape == (2, 1, 8)
    np.testing.assert_array_equal(views.overlays, patches[2:, :2, :2] + 1)
    np.testing.assert_array_equal(with_overlay.overlays, patches[:2, :2, :2] + 1)
    np.testing.assert_array_equal(other_overlay.overlays, patches[2:, :2, :2] + 1)
    np.testing.assert_allclose(other_overlay.logits, predict_samples(run, patches[2:], tta=1), atol=1e-5)


def test_a_full_queue_refuses_with_server_busy(run, patch_files):
    patch = decode_patch_file(patch_files[0]).patch[None]
    release = threading.Event()
    batcher = PredictionBatcher(lambda batch, tta: (release.wait(timeout=60), predict_samples(run, batch))[1],
                                lambda batch: batch, max_batch_patches=1, max_wait_ms=0, max_queued_views=2)
    batcher.start()
    try:
        running = batcher.submit(patch, tta=1)
        while batcher.queued_patches:
            time.sleep(0.01)
        queued = [batcher.submit(patch, tta=1), batcher.submit(patch, tta=1)]
        with pytest.raises(ServerBusy, match=r"^server busy: 2 patches queued, 2 test-time views of work "
                                             r"\(limit 2; this request 1\); retry in 1 s$"):
            batcher.submit(patch, tta=1)
        release.set()
        for future in [running, *queued]:
            assert future.result(timeout=60).logits.shape == (1, 1, 1)
    finally:
        batcher.stop()


def test_the_queue_also_bounds_patches_so_few_view_requests_cannot_fill_memory(patch_files):
    # Counted in views alone, a server at --tta 8 queued 8x --max-queued-patches patches of 1-view requests.
    patch = decode_patch_file(patch_files[0]).patch[None]
    score, started, passes = gated(lambda batch, tta: np.zeros((len(batch), 1, tta), np.float32))
    batcher = PredictionBatcher(score, lambda batch: batch, max_batch_patches=256, max_wait_ms=0,
                                max_queued_views=100, max_queued_patches=2)
    batcher.start()
    try:
        running = batcher.submit(patch, tta=1)
        assert started.get(timeout=20) == 1  # the worker holds it: the queue is empty
        queued = [batcher.submit(patch, tta=1) for _ in range(2)]
        assert (batcher.queued_patches, batcher.queued_views) == (2, 2)
        with pytest.raises(ServerBusy, match=r"^server busy: 2 patches queued, 2 test-time views of work "
                                             r"\(limit 100 views, 2 patches; this request 1\); retry in \d+ s$"):
            batcher.submit(patch, tta=1)
        passes.release(2)
        assert all(f.result(timeout=20).logits.shape == (1, 1, 1) for f in (running, *queued))
    finally:
        passes.release(8)
        batcher.stop()


def test_a_request_cancelled_while_queued_is_skipped_and_the_worker_keeps_serving(run, patch_files):
    """An ASGI server that cancels a request (client gone, shutdown) cancels its future: the worker must live on."""
    patch = decode_patch_file(patch_files[0]).patch[None]
    release, scoring, scored = threading.Event(), threading.Event(), []

    def score(batch: np.ndarray, tta: int) -> np.ndarray:
        scoring.set()
        release.wait(timeout=60)  # hold the first call so that the next request waits in the queue
        scored.append(len(batch))
        return predict_samples(run, batch, tta=tta)

    batcher = PredictionBatcher(score, lambda batch: batch, max_batch_patches=1, max_wait_ms=0, max_queued_views=8)
    batcher.start()
    try:
        running = batcher.submit(patch, tta=1)
        assert scoring.wait(timeout=60)
        gone = batcher.submit(patch, tta=1)
        assert gone.cancel()
        release.set()
        assert running.result(timeout=60).logits.shape == (1, 1, 1)
        assert batcher.submit(patch, tta=1).result(timeout=60).logits.shape == (1, 1, 1)
    finally:
        batcher.stop()
    assert scored == [1, 1], "the cancelled request was not scored"
    assert batcher.queued_patches == 0


def gated(score):
    """`score` behind a gate: each model call puts its patch count on `started`, then waits for a pass."""
    started, passes = queue.Queue(), threading.Semaphore(0)

    def gated_score(*args, **kwargs):
        started.put(next(len(a) for a in args if isinstance(a, np.ndarray)))
        assert passes.acquire(timeout=20), "the test never let this model call through"
        return score(*args, **kwargs)

    return gated_score, started, passes


def wait_until(condition, what: str, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.005)


def test_the_queue_counts_test_time_views_and_overlays_not_patches(patch_files):
    from histodetect.serve.batcher import OVERLAY_VIEWS

    patch = decode_patch_file(patch_files[0]).patch[None]
    score, started, passes = gated(lambda batch, tta: np.zeros((len(batch), 1, tta), np.float32))
    limit = 16 + OVERLAY_VIEWS  # room for a patch at 8 views and one at 8 views with an overlay
    batcher = PredictionBatcher(score, lambda batch: batch, max_batch_patches=256, max_wait_ms=0,
                                max_queued_views=limit)
    batcher.start()
    try:
        running = batcher.submit(patch, tta=1)
        assert started.get(timeout=20) == 1  # the worker holds it: the queue is empty
        big = batcher.submit(np.repeat(patch, 2, axis=0), tta=72)  # 144 views, over the limit on its own:
        assert (batcher.queued_patches, batcher.queued_views) == (2, 144)  # taken, as the queue was empty
        with pytest.raises(ServerBusy, match=r"^server busy: 2 patches queued, 144 test-time views of work "
                                             rf"\(limit {limit}; this request 1\); retry in \d+ s$"):
            batcher.submit(patch, tta=1)
        passes.release()
        assert started.get(timeout=20) == 2  # the big request is being scored; the queue is empty again
        assert batcher.queued_views == 0
        views = batcher.submit(patch, tta=8)
        overlaid = batcher.submit(patch, tta=8, overlay=True)
        assert (batcher.queued_patches, batcher.queued_views) == (2, limit)  # 2 patches fill the queue
        with pytest.raises(ServerBusy, match=rf"server busy: 2 patches queued, {limit} test-time views"):
            batcher.submit(patch, tta=1)
        passes.release(2)  # one model call for both: the same tta
        assert [f.result(timeout=20).logits.shape for f in (running, big, views, overlaid)] == [
            (1, 1, 1), (2, 1, 72), (1, 1, 8), (1, 1, 8)]
        assert overlaid.result().overlays.shape == (1, 96, 96, 3)
    finally:
        passes.release(8)
        batcher.stop()
    assert batcher.stats.views == 1 + 144 + limit and batcher.queued_views == 0


def test_a_cancelled_job_frees_its_pixels_while_the_worker_is_busy(patch_files):
    # Its room in the queue goes to new requests at once, so pixels it kept until the worker
    # reached it would be over the limit: 200 clients that upload 256 patches and hang up
    # held 1.3 GiB with a limit of 4096 patches.
    patch = decode_patch_file(patch_files[0]).patch[None]
    score, started, passes = gated(lambda batch, tta: np.zeros((len(batch), 1, tta), np.float32))
    batcher = PredictionBatcher(score, lambda batch: batch, max_batch_patches=256, max_wait_ms=0,
                                max_queued_views=8)
    batcher.start()
    try:
        running = batcher.submit(patch, tta=1)
        assert started.get(timeout=20) == 1  # the worker is held: what follows stays queued
        pixels = []
        for _ in range(3):  # 3 x 8 views through a queue of 8: each room is taken again after a cancel
            patches = np.repeat(patch, 8, axis=0)
            pixels.append(weakref.ref(patches))
            batcher.submit(patches, tta=1).cancel()
            del patches
        gc.collect()
        assert [ref() is None for ref in pixels] == [True] * 3, "a cancelled job kept its patches"
        passes.release()
        assert running.result(timeout=20).logits.shape == (1, 1, 1)
    finally:
        passes.release(8)
        batcher.stop()
    assert batcher.stats.requests == 1 and batcher.queued_views == 0


def test_retry_after_is_the_measured_time_to_work_through_the_queue(patch_files):
    from histodetect.serve.batcher import MAX_RETRY_AFTER_S, retry_after_s

    patch = decode_patch_file(patch_files[0]).patch[None]
    now_s = [0.0]

    def score(batch: np.ndarray, tta: int) -> np.ndarray:  # a model that does 100 views a second
        now_s[0] += len(batch) * tta / 100
        return np.zeros((len(batch), 1, tta), np.float32)

    score, started, passes = gated(score)
    batcher = PredictionBatcher(score, lambda batch: batch, max_batch_patches=256, max_wait_ms=0,
                                max_queued_views=1000, timer=lambda: now_s[0])
    batcher.start()
    try:
        first = batcher.submit(patch, tta=1)
        started.get(timeout=20)
        batcher.submit(np.repeat(patch, 125, axis=0), tta=8)  # 1000 views: the queue is full
        with pytest.raises(ServerBusy) as unmeasured:
            batcher.submit(patch, tta=1)
        assert unmeasured.value.retry_after_s == 1, "no model call has finished: nothing measured yet"
        passes.release()
        first.result(timeout=20)
        assert started.get(timeout=20) == 125  # the worker is on the 1000 views; nothing is queued
        batcher.submit(np.repeat(patch, 50, axis=0), tta=8)  # 400 views
        batcher.submit(np.repeat(patch, 75, axis=0), tta=8)  # 600 more: full
        with pytest.raises(ServerBusy, match=r"retry in 10 s$") as busy:
            batcher.submit(patch, tta=1)
        assert busy.value.retry_after_s == 10 and batcher.views_per_s == pytest.approx(100)  # 1000 views / 100 a second
    finally:
        passes.release(8)
        batcher.stop()
    assert retry_after_s(10**6, 100) == MAX_RETRY_AFTER_S == 60 and retry_after_s(1, 100) == 1


def test_a_flood_of_many_view_requests_gets_503_with_retry_after_from_the_measured_rate(run, patch_files,
                                                                                        monkeypatch):
    import histodetect.serve.app as app_module
    from histodetect.serve.batcher import retry_after_s

    score, started, passes = gated(predict_samples)
    monkeypatch.setattr(app_module, "predict_samples", score)
    files = multipart(patch_files[:1])
    # 4 patches at the server's 8 views: the queue holds 32 views, whatever the requests ask for.
    with TestClient(create_app(run, ServeConfig(max_files=4, max_queued_patches=4, tta=8))) as client, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        passes.release()
        assert client.post("/v1/predict", files=files).status_code == 200  # measures the model's speed
        assert started.get(timeout=20) == 1
        running = pool.submit(client.post, "/v1/predict", files=files)
        assert started.get(timeout=20) == 1  # the model is held on it
        queued = pool.submit(client.post, "/v1/predict?tta=72", files=files)  # 72 views: over the limit
        wait_until(lambda: client.get("/health").json()["queued_views"] == 72, "the request queued")
        health = client.get("/health").json()
        assert (health["queued_patches"], health["queued_views"]) == (1, 72)
        busy = client.post("/v1/predict?tta=1", files=files)  # one view more is too much
        assert busy.status_code == 503
        batcher = client.app.state.batcher
        assert busy.headers["retry-after"] == str(retry_after_s(72, batcher.views_per_s))
        assert busy.json()["error"].startswith("server busy: 1 patch queued, 72 test-time views of work "
                                               "(limit 32 views, 4 patches; this request 1);")
        passes.release(2)
        assert running.result(timeout=20).status_code == queued.result(timeout=20).status_code == 200
        assert queued.result().json()["tta"] == 72


def _raw_predict(port: int, patch_file: Path) -> socket.socket:
    """A socket that has sent POST /v1/predict with one patch and reads nothing: close it to leave."""
    boundary = "histodetect-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{patch_file.name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + patch_file.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(head + body)
    return sock


def test_a_request_whose_client_leaves_while_queued_is_never_scored(run, patch_files, monkeypatch, caplog):
    import httpx

    import histodetect.serve.app as app_module

    score, started, passes = gated(predict_samples)
    monkeypatch.setattr(app_module, "predict_samples", score)
    app = create_app(run)
    batcher = app.state.batcher
    with serving(app, log_config=None) as (server, port), concurrent.futures.ThreadPoolExecutor(1) as pool:
        url = f"http://127.0.0.1:{port}/v1/predict"
        running = pool.submit(httpx.post, url, files=multipart(patch_files[:1]), timeout=20)
        assert started.get(timeout=20) == 1  # the model is held on it
        leaving = _raw_predict(port, patch_files[1])
        wait_until(lambda: batcher.queued_patches == 1, "the second request queued")
        leaving.close()
        # Released by the request itself: the worker is still held on the first one.
        wait_until(lambda: (batcher.queued_patches, batcher.queued_views) == (0, 0), "the queue emptied")
        wait_until(lambda: len(server.server_state.tasks) == 1, "the second request ended")
        passes.release()
        assert running.result(timeout=20).status_code == 200
        passes.release()
        assert httpx.post(url, files=multipart(patch_files[2:3]), timeout=20).status_code == 200
    assert started.qsize() == 1, "two model calls after the first: the request that left was not scored"
    assert batcher.stats.requests == batcher.stats.patches == 2 and batcher.queued_patches == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_client_that_leaves_while_its_patches_are_scored_does_not_stop_the_worker(run, patch_files, monkeypatch,
                                                                                      caplog):
    import httpx

    import histodetect.serve.app as app_module

    score, started, passes = gated(predict_samples)
    monkeypatch.setattr(app_module, "predict_samples", score)
    app = create_app(run)
    with serving(app, log_config=None) as (server, port):
        leaving = _raw_predict(port, patch_files[0])
        assert started.get(timeout=20) == 1  # being scored: too late to cancel
        leaving.close()
        wait_until(lambda: not server.server_state.tasks, "the request ended without its answer")
        passes.release(2)  # the abandoned call finishes; its answer is dropped
        response = httpx.post(f"http://127.0.0.1:{port}/v1/predict", files=multipart(patch_files[1:2]), timeout=20)
        assert response.status_code == 200
    assert app.state.batcher.stats.requests == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_concurrent_http_requests_all_get_their_own_answers(client, run, patch_files):
    patches = np.stack([decode_patch_file(p).patch for p in patch_files])
    expected = predict_patches(run, patches)

    def one(i: int) -> float:
        response = client.post("/v1/predict", files=multipart([patch_files[i]]))
        return response.json()["results"][0]["prob_tumour"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        probs = list(pool.map(one, range(len(patch_files))))
    np.testing.assert_allclose(probs, expected, atol=1e-5)


# --- the web page in headless Chromium -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(app, **uvicorn_options):
    """`app` on a real socket: uvicorn in a thread on a free loopback port; yields the server and its port."""
    import uvicorn

    # A socket bound here and handed over: a port found free and bound again later could be taken in between.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    try:
        yield server, port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def live_server(run):
    """The app on a real socket, for the browser."""
    with serving(create_app(run)) as (_, port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("headless Chromium and chromedriver are not installed; run scripts/install-browser.sh "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.downloads = downloads
    yield driver
    driver.quit()


def test_the_page_scores_an_uploaded_patch_and_shows_probability_and_overlay(browser, live_server, client, patch_files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answer = client.post("/v1/predict", files=multipart(patch_files[:3])).json()
    expected, threshold = answer["results"], answer["threshold"]
    browser.get(live_server + "/")
    WebDriverWait(browser, 30).until(lambda d: "histo_tinynet" in d.find_element(By.ID, "model-card").text)
    browser.find_element(By.ID, "overlay").click()
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in patch_files[:3]))
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.result")) == 3)
    for result in expected:
        row = browser.find_element(By.CSS_SELECTOR, f'tr.result[data-name="{result["id"]}"]')
        assert row.find_element(By.CSS_SELECTOR, ".prob").text.startswith(f"{result['prob_tumour']:.4f}")
        assert row.find_element(By.CSS_SELECTOR, ".label").text == ("tumour" if result["label"] else "normal")
        marker = row.find_element(By.CSS_SELECTOR, ".bar i").get_attribute("title")
        assert marker == f"threshold {threshold:.3f}", "the marker sits at the response's threshold"
        overlay = row.find_element(By.CSS_SELECTOR, "img.overlay")
        WebDriverWait(browser, 10).until(lambda d, img=overlay: d.execute_script("return arguments[0].naturalWidth", img) > 0)
        assert browser.execute_script("return arguments[0].naturalWidth", overlay) >= 96

    shown = sorted(expected, key=lambda r: -r["prob_tumour"])
    names = [row.get_attribute("data-name") for row in browser.find_elements(By.CSS_SELECTOR, "tr.result")]
    assert names == [r["id"] for r in shown], "sorted by probability, high first"
    between = (shown[1]["prob_tumour"] + shown[2]["prob_tumour"]) / 2  # keeps the top two
    low_filter = browser.find_element(By.ID, "min-prob")
    low_filter.clear()
    low_filter.send_keys(repr(between))
    WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.result")) == 2)

    browser.find_element(By.ID, "download").click()
    csv_path = browser.downloads / "histodetect-results.csv"
    WebDriverWait(browser, 20).until(lambda d: csv_path.is_file() and csv_path.stat().st_size > 0)
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [r["id"] for r in shown[:2]]
    np.testing.assert_allclose([float(r["prob_tumour"]) for r in rows], [r["prob_tumour"] for r in shown[:2]], atol=1e-9)



def test_the_page_shows_a_tiff_patch_the_server_sent_back_as_png(browser, live_server, kaggle_sample):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tiff = sorted((kaggle_sample / "test").glob("*.tif"))[0]
    browser.get(live_server + "/")
    WebDriverWait(browser, 30).until(lambda d: "histo_tinynet" in d.find_element(By.ID, "model-card").text)
    browser.find_element(By.ID, "file-input").send_keys(str(tiff))
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'tr.result[data-name="{tiff.name}"]'))
    image = browser.find_element(By.CSS_SELECTOR, f'tr.result[data-name="{tiff.name}"] img.patch')
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) == 96)


@pytest.fixture(scope="module")
def mapless_run(run):
    """`run` with a model that has no feature map in place of its CNN."""
    import dataclasses

    return dataclasses.replace(run, model=PooledColour().eval())


def test_a_model_without_a_feature_map_is_served_without_overlays_and_says_why(client, mapless_run, patch_files):
    assert client.get("/v1/model").json()["serving"]["overlay"] == "gradcam"
    with TestClient(create_app(mapless_run)) as mapless_client:
        serving = mapless_client.get("/v1/model").json()["serving"]
        assert serving["overlay"] is None
        assert serving["no_overlay_because"] == ("PooledColour: no layer outputs a feature map (N, C, H, W) or a grid "
                                                 "of patch tokens; CAMs need a CNN or a vision transformer")
        assert mapless_client.post("/v1/predict", files=multipart(patch_files[:2])).status_code == 200


def test_the_page_offers_no_overlay_for_a_model_without_a_feature_map(browser, mapless_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(create_app(mapless_run)) as (_, port):
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-card").text.startswith("Model:"))
        box = browser.find_element(By.ID, "overlay")
        WebDriverWait(browser, 10).until(lambda d: not box.is_enabled())
        assert "CAMs need a CNN" in box.find_element(By.XPATH, "..").get_attribute("title")


def test_the_page_shows_a_file_added_again_once_unless_its_settings_changed(browser, live_server, patch_files):
    # Dropping a folder twice listed every patch twice, and the downloaded CSV held both.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(live_server + "/")
    WebDriverWait(browser, 30).until(lambda d: "histo_tinynet" in d.find_element(By.ID, "model-card").text)
    status = browser.find_element(By.ID, "status")
    rows = lambda d: d.find_elements(By.CSS_SELECTOR, "tr.result")  # noqa: E731
    for _ in range(2):
        browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in patch_files[:2]))
        WebDriverWait(browser, 30).until(lambda d: status.text == "Scored 2 patches.")
        browser.execute_script("arguments[0].textContent = ''", status)
    assert len(rows(browser)) == 2
    Select(browser.find_element(By.ID, "tta")).select_by_value("8")
    browser.find_element(By.ID, "file-input").send_keys(str(patch_files[0]))
    WebDriverWait(browser, 30).until(lambda d: status.text == "Scored 1 patch.")
    assert len(rows(browser)) == 3, "another TTA is another result"

def test_the_page_marks_a_bad_file_and_still_scores_the_good_ones(browser, live_server, patch_files, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    formula = tmp_path / "=1+2.jpg"  # a spreadsheet would run the name in the downloaded CSV
    shutil.copy(patch_files[3], formula)
    browser.get(live_server + "/")
    browser.find_element(By.ID, "file-input").send_keys(f"{patch_files[4]}\n{bad}\n{formula}")
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.result")) == 3)
    failed = browser.find_element(By.CSS_SELECTOR, "tr.failed")
    assert failed.get_attribute("data-name") == "notes.png" and "not an image" in failed.text
    assert browser.find_element(By.CSS_SELECTOR, f'tr.result[data-name="{patch_files[4].name}"] .prob').text

    csv_path = browser.downloads / "histodetect-results.csv"
    csv_path.unlink(missing_ok=True)  # an earlier test's download
    browser.find_element(By.ID, "download").click()
    WebDriverWait(browser, 20).until(lambda d: csv_path.is_file() and csv_path.stat().st_size > 0)
    with csv_path.open() as handle:
        files = {row["file"]: row for row in csv.DictReader(handle)}
    assert set(files) == {patch_files[4].name, "notes.png", "'=1+2.jpg"}
    assert float(files["'=1+2.jpg"]["prob_tumour"]) > 0 and files["notes.png"]["prob_tumour"] == ""


def test_the_page_is_usable_from_the_keyboard_and_counts_each_batch_on_its_own(browser, live_server, patch_files,
                                                                             tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live_server + "/")
    WebDriverWait(browser, 30).until(lambda d: "histo_tinynet" in d.find_element(By.ID, "model-card").text)
    assert not browser.find_element(By.ID, "controls").is_displayed(), "no sort, filter or download before results"
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "file-input", "Tab reaches 'Choose files'"

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    status = browser.find_element(By.ID, "status")
    browser.find_element(By.ID, "file-input").send_keys(f"{patch_files[5]}\n{bad}")
    WebDriverWait(browser, 60).until(lambda d: status.text.startswith("Scored"))
    assert status.text == "Scored 1 of 2 patches. 1 could not be scored: see the rows marked in red."
    browser.find_element(By.ID, "file-input").send_keys(str(patch_files[6]))
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.result")) == 3)
    WebDriverWait(browser, 10).until(lambda d: status.text.startswith("Scored"))
    assert status.text == "Scored 1 patch.", "the earlier batch's failure is not counted again"

    # An emptied bound is no bound, not 0. Erased by keys as a user would: clear() fires no
    # input event, so the page would never filter and the check could not fail.
    high = browser.find_element(By.ID, "max-prob")
    high.send_keys(Keys.CONTROL, "a")
    high.send_keys(Keys.BACKSPACE)
    assert high.get_attribute("value") == ""
    assert browser.find_element(By.ID, "shown").text == "3 of 3 shown"


def test_clear_while_scoring_stops_that_batch_and_the_next_pick_stands_alone(browser, live_server, patch_files):
    # It went on sending the rest, so a cleared page filled again, said 'Scored 4 patches.' with
    # 3 shown, and a pick after Clear waited for the cleared files and landed among them.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live_server + "/")
    WebDriverWait(browser, 30).until(lambda d: "histo_tinynet" in d.find_element(By.ID, "model-card").text)
    # One file a request, each answer held back 0.5 s: Clear lands while the batch is scoring.
    browser.execute_script("""
      state.limits.max_files = 1;
      const send = window.fetch;
      window.fetch = (url, options) => send(url, options).then(
        (response) => new Promise((resolve) => setTimeout(() => resolve(response), 500)));
    """)
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(path) for path in patch_files[:4]))
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.result"))
    browser.find_element(By.ID, "clear").click()
    browser.find_element(By.ID, "file-input").send_keys(str(patch_files[5]))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: status.text.startswith("Scored"))
    assert status.text == "Scored 1 patch."
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.result")
    assert [row.get_attribute("data-name") for row in rows] == [patch_files[5].name]
