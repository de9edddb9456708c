"""`download_pcam` against a local HTTP server: resume, md5, unpack, errors.

The server on 127.0.0.1 serves a tiny PCam-shaped h5 (gzipped, as Zenodo serves
it) and a small meta CSV. Nothing here touches the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest

from histodetect.data.download import PCAM_FILES, download_pcam
from histodetect.errors import UserError

X_NAME = "camelyonpatch_level_2_split_valid_x.h5.gz"
META_NAME = "camelyonpatch_level_2_split_valid_meta.csv"


@dataclass
class ServedFiles:
    """What the server serves and how it behaves; each test sets what it needs."""

    contents: dict[str, bytes]
    honours_range: bool = True
    cut_after_bytes: int | None = None  # send only this many bytes of a body, then hang up
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (name, Range header)


class RangeHandler(BaseHTTPRequestHandler):
    """GET with `Range: bytes=N-` support, which `SimpleHTTPRequestHandler` lacks."""

    served: ServedFiles

    def do_GET(self) -> None:
        name = self.path.removeprefix("/files/")
        range_header = self.headers.get("Range")
        self.served.requests.append((name, range_header))
        body = self.served.contents.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if range_header is not None and self.served.honours_range:
            start = int(range_header.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:][: self.served.cut_after_bytes])

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest's output clean


@pytest.fixture(scope="module")
def source_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.integers(0, 256, size=(4, 96, 96, 3), dtype=np.uint8),
        "y": np.array([0, 1, 1, 0], dtype=np.uint8).reshape(4, 1, 1, 1),
    }


@pytest.fixture(scope="module")
def pcam_bytes(source_arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    h5_buffer = io.BytesIO()
    with h5py.File(h5_buffer, "w") as f:
        for key, array in source_arrays.items():
            f.create_dataset(key, data=array)
    meta_csv = b"coord_y,coord_x,tumor_patch,center_tumor_patch,wsi\n" + b"".join(
        f"{i},{2 * i},False,False,camelyon16_train_normal_001\n".encode() for i in range(4)
    )
    return {X_NAME: gzip.compress(h5_buffer.getvalue()), META_NAME: meta_csv}


@pytest.fixture
def true_md5s(pcam_bytes: dict[str, bytes]) -> dict[str, str | None]:
    return {X_NAME: hashlib.md5(pcam_bytes[X_NAME]).hexdigest(), META_NAME: None}


@pytest.fixture
def server(pcam_bytes: dict[str, bytes]) -> Iterator[tuple[str, ServedFiles]]:
    """A threaded HTTP server on a free port; yields (base URL, its ServedFiles)."""
    served = ServedFiles(contents=dict(pcam_bytes))
    handler = type("Handler", (RangeHandler,), {"served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # Poll often: `shutdown` waits out one poll, 0.5 s by default, for every test.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/files", served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def assert_is_the_source(root: Path, source_arrays: dict[str, np.ndarray]) -> None:
    with h5py.File(root / "camelyonpatch_level_2_split_valid_x.h5", "r") as f:
        for key, array in source_arrays.items():
            np.testing.assert_array_equal(f[key][()], array)


def test_download_fetches_verifies_and_unpacks(tmp_path, server, true_md5s, source_arrays, pcam_bytes):
    base_url, _ = server
    paths = download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)

    assert paths == [tmp_path / "camelyonpatch_level_2_split_valid_x.h5", tmp_path / META_NAME]
    assert_is_the_source(tmp_path, source_arrays)
    assert (tmp_path / META_NAME).read_bytes() == pcam_bytes[META_NAME]
    # The .gz goes once unpacked; no .part is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_checksum_mismatch_deletes_the_file_and_names_both_md5s(tmp_path, server, true_md5s):
    base_url, _ = server
    wrong_md5 = "0" * 32
    with pytest.raises(UserError) as caught:
        download_pcam(tmp_path, base_url=base_url, files={**true_md5s, X_NAME: wrong_md5}, progress=False)

    message = str(caught.value)
    assert X_NAME in message
    assert wrong_md5 in message and true_md5s[X_NAME] in message
    assert "run the same command again" in message
    assert "\n" not in message
    assert not (tmp_path / X_NAME).exists()
    assert not (tmp_path / f"{X_NAME}.part").exists()


def test_a_partial_download_resumes_with_a_range_request(tmp_path, server, true_md5s, source_arrays, pcam_bytes):
    base_url, served = server
    half = len(pcam_bytes[X_NAME]) // 2
    (tmp_path / f"{X_NAME}.part").write_bytes(pcam_bytes[X_NAME][:half])

    download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)

    assert (X_NAME, f"bytes={half}-") in served.requests
    assert_is_the_source(tmp_path, source_arrays)


def test_a_server_that_ignores_range_restarts_from_zero(tmp_path, server, true_md5s, source_arrays, pcam_bytes):
    base_url, served = server
    served.honours_range = False
    # Junk, so that appending to it instead of starting over would fail the md5.
    (tmp_path / f"{X_NAME}.part").write_bytes(b"\xff" * (len(pcam_bytes[X_NAME]) // 2))

    download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)

    assert any(name == X_NAME and range_header is not None for name, range_header in served.requests)
    assert_is_the_source(tmp_path, source_arrays)


def test_a_part_as_long_as_the_file_is_fetched_again(tmp_path, server, true_md5s, source_arrays, pcam_bytes):
    # A run stopped between the last byte and the rename: the server answers 416.
    base_url, served = server
    (tmp_path / f"{X_NAME}.part").write_bytes(pcam_bytes[X_NAME])

    download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)

    assert [r for n, r in served.requests if n == X_NAME] == [f"bytes={len(pcam_bytes[X_NAME])}-", None]
    assert_is_the_source(tmp_path, source_arrays)


def test_a_cut_connection_keeps_the_part_and_the_rerun_finishes(
    tmp_path, server, true_md5s, source_arrays, pcam_bytes
):
    base_url, served = server
    served.cut_after_bytes = 1000
    total = len(pcam_bytes[X_NAME])
    expected = (
        f"{base_url}/{X_NAME}: connection closed after 1000 of {total} bytes; "
        "run the same command again to resume."
    )
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)
    assert (tmp_path / f"{X_NAME}.part").stat().st_size == 1000

    served.cut_after_bytes = None
    download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)

    assert (X_NAME, "bytes=1000-") in served.requests
    assert_is_the_source(tmp_path, source_arrays)


def test_a_missing_file_names_the_url_and_the_status(tmp_path, server):
    base_url, _ = server
    with pytest.raises(UserError) as caught:
        download_pcam(tmp_path, base_url=base_url, files={"missing.csv": None}, progress=False)

    assert str(caught.value) == (
        f"{base_url}/missing.csv: HTTP 404 Not Found; run the same command again to resume."
    )


def test_an_unreachable_server_is_one_user_error(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    expected = rf"^{re.escape(base_url)}/{META_NAME}: cannot connect \(.*\); run the same command again to resume\.$"
    with pytest.raises(UserError, match=expected):
        download_pcam(tmp_path, base_url=base_url, files={META_NAME: None}, progress=False, timeout_s=5)


def test_a_rerun_after_completion_downloads_nothing(tmp_path, server, true_md5s):
    base_url, served = server
    first = download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)
    served.requests.clear()

    second = download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)

    assert second == first
    assert served.requests == []


def test_pcam_table_lists_nine_files_with_the_corrected_valid_and_test_md5s():
    assert len(PCAM_FILES) == 9
    assert all(md5 is None for name, md5 in PCAM_FILES.items() if name.endswith(".csv"))
    assert all(re.fullmatch(r"[0-9a-f]{32}", md5) for name, md5 in PCAM_FILES.items() if name.endswith(".h5.gz"))
    # PCam's own README gives these two the other way round.
    assert PCAM_FILES["camelyonpatch_level_2_split_valid_x.h5.gz"] == "d5b63470df7cfa627aeec8b9dc0c066e"
    assert PCAM_FILES["camelyonpatch_level_2_split_test_x.h5.gz"] == "d8c2d60d490dbd479f8199bdfa0cf6ec"


def test_a_full_disk_names_the_file_and_the_rerun_resumes(tmp_path, server, true_md5s, source_arrays, pcam_bytes,
                                                          monkeypatch):
    # Python's write error names no file: "[Errno 28] No space left on device".
    import errno
    import os

    import histodetect.data.download as download_module

    base_url, served = server
    real_copy, copies = download_module._copy, []

    def fill_the_disk_on_the_second_file(source, out, bar, md5=None):
        copies.append(1)
        if len(copies) == 2:
            out.write(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(source, out, bar, md5)

    monkeypatch.setattr(download_module, "_copy", fill_the_disk_on_the_second_file)
    with pytest.raises(UserError, match=r"^.*\.h5: cannot write it \(No space left on device\); free some space and "
                                        r"run the same command again to resume$"):
        download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)
    monkeypatch.undo()
    download_pcam(tmp_path, base_url=base_url, files=true_md5s, progress=False)
    assert_is_the_source(tmp_path, source_arrays)


def test_a_read_only_disk_is_not_told_to_free_some_space(tmp_path):
    import errno
    import os

    from histodetect.outputs import naming_write_errors

    for code, advice in ((errno.ENOSPC, "; free some space and run the same command again to resume"),
                         (errno.EROFS, "")):
        with pytest.raises(UserError) as error, \
                naming_write_errors(tmp_path / "x.h5", "; free some space and run the same command again to resume"):
            raise OSError(code, os.strerror(code))
        assert str(error.value) == f"{tmp_path / 'x.h5'}: cannot write it ({os.strerror(code)}){advice}"
