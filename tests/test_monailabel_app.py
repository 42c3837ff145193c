"""The MONAI Label app (monailabel_app/) served by a real `monailabel start_server` on localhost, with the shipped
default model: GET /info/ lists the card's organs as the model's labels; POST /infer/medclipsam segments a phantom by
organ names and returns a label map in the input's exact geometry; a box, then clicks, on the liver refine only the
liver (on the cached slice encodings) and leave the spleen voxel for voxel. The server runs in the MONAI Label
environment (.venv-label, made by monailabel_app/setup_env.sh); request parsing is also tested here without it."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medclipsam.data.concepts import load_card
from medclipsam.data.phantom import make_phantom
from medclipsam.errors import InputError

from helpers_scans import lps_flip

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "monailabel_app"
LABEL_ENV = Path(os.environ.get("MEDCLIPSAM_LABEL_ENV", ROOT / ".venv-label"))
LABEL_PYTHON = LABEL_ENV / "bin" / "python"
ORGANS = {"liver": 1, "spleen": 2}  # phantom card ids
SLICES = slice(2, 8)  # a 64 x 64 x 6 phantom (6 mm voxels): the liver lies on its slices 1..5
START_TIMEOUT_S, REQUEST_TIMEOUT_S = 120, 180
SERVER_ENV = {  # no training, scoring, sessions or file watching: only what inference needs
    "MONAI_LABEL_TASKS_TRAIN": "false", "MONAI_LABEL_TASKS_SCORING": "false", "MONAI_LABEL_TASKS_BATCH_INFER": "false",
    "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false",
    "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT),  # this checkout's medclipsam, whatever the env was made from
}
needs_label_env = pytest.mark.skipif(
    not LABEL_PYTHON.exists(),
    reason=f"no MONAI Label environment at {LABEL_ENV}: create it with `bash monailabel_app/setup_env.sh` "
           "(monailabel needs numpy<2, so it has its own environment), or set MEDCLIPSAM_LABEL_ENV to one it made")


def _parse_request(request: dict):
    sys.path.insert(0, str(APP))
    try:
        from lib.prompts import parse_request
    finally:
        sys.path.remove(str(APP))
    card = load_card("phantom")
    return parse_request(request, card, card.names())


def test_requests_name_organs_and_clicks_in_the_clients_voxels(tmp_path):
    parsed = _parse_request({"organs": "Liver, spleen", "model": "medclipsam", "image": "x"})
    assert parsed.organs == ["liver", "spleen"] and parsed.refinements == [] and not parsed.edit
    parsed = _parse_request({"liver": [[4, 5, 2]], "spleen": [], "background": [[1, 1, 2]]})
    assert [(r.organ, r.box, r.points) for r in parsed.refinements] == [("liver", None, [(4, 5, 2, 1), (1, 1, 2, 0)])]
    parsed = _parse_request({"organ": "liver", "box": [1, 2, 0, 9, 8, 3], "foreground": [[4, 4, 1]]})
    assert [(r.organ, r.box, r.points) for r in parsed.refinements] == [("liver", (1, 2, 0, 9, 8, 3), [(4, 4, 1, 1)])]
    # 3D Slicer (DeepEdit): every segment's clicks, "background" as a segment, "label" the segment being edited
    slicer = {"liver": [[4, 5, 2]], "spleen": [[30, 9, 1]], "background": [[1, 1, 2]], "label": "spleen"}
    parsed = _parse_request(slicer)
    assert [(r.organ, r.points) for r in parsed.refinements] == [("spleen", [(30, 9, 1, 1), (1, 1, 2, 0)])]
    parsed = _parse_request({**slicer, "spleen": []})  # only background clicks: an edit that changes nothing
    assert parsed.refinements == [] and parsed.edit
    uploaded = tmp_path / "label.nii.gz"  # MONAI Label's own "label": an uploaded label file, not an organ
    uploaded.touch()
    assert _parse_request({"label": str(uploaded)}).refinements == []


@pytest.mark.parametrize("request_, message", [
    ({"organs": ["livr"]}, "names no organ of card 'phantom' (close: 'liver')"),
    ({"box": [1, 2, 3, 4, 5, 6]}, "need the organ they outline"),
    ({"organ": "liver", "box": [1, 2, 3]}, "is not a list of 6 numbers"),
    ({"liver": [[1, "a", 3]]}, "holds a value that is not a number"),
    ({"background": [[1, 2, 3]]}, "do not say which organ"),
])
def test_bad_requests_say_what_to_send(request_, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _parse_request(request_)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down cleanly), then SIGKILL if it has not ended within 15 s."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A phantom stored left-posterior first in the studies folder, and the app served from a copy of its folder
    (MONAI Label writes logs/ and model/ into the app folder); always stopped at the end."""
    root = tmp_path_factory.mktemp("monailabel")
    phantom = make_phantom(3, shape=(64, 64, 8), spacing=(6.0, 6.0, 6.0))  # an adult's 384 mm across, as a CT shows it
    studies = root / "studies"
    studies.mkdir()
    shape = phantom.image[..., SLICES].shape
    affine = phantom.affine.copy()
    affine[:3, 3] += affine[:3, 2] * SLICES.start
    hu = np.clip(np.rint(phantom.image[..., SLICES]), -1024, 3071).astype(np.int16)[::-1, ::-1].copy()
    image = nib.Nifti1Image(hu, affine @ lps_flip(shape))
    nib.save(image, studies / "phantom.nii.gz")
    app = shutil.copytree(APP, root / "app", ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))
    port = _free_port()
    log = open(root / "server.log", "wb")
    server = subprocess.Popen([str(LABEL_PYTHON), "-m", "monailabel.main", "start_server", "--app", str(app),
                               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)],
                              env={**os.environ, **SERVER_ENV}, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        info = None
        while info is None:
            if server.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"monailabel start_server did not come up (exit {server.poll()}):\n{tail}")
            try:
                info = _get(f"{url}/info/")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        yield {"url": url, "info": info, "image": image, "label": phantom.label[::-1, ::-1, SLICES],
               "log": root / "server.log"}
    finally:
        _stop(server)
        log.close()


def _infer(served: dict, params: dict) -> tuple[nib.Nifti1Image | None, dict]:
    """POST /infer/medclipsam on the studies' phantom: the label map returned (None if none) and the result JSON."""
    query = urllib.parse.urlencode({"image": "phantom"})
    body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
    request = urllib.request.Request(f"{served['url']}/infer/medclipsam?{query}", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        kind, payload = response.headers["Content-Type"], response.read()
    if kind.startswith("application/json"):
        return None, json.loads(payload)
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {kind}\r\n\r\n".encode() + payload)
    parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
             for part in message.iter_parts()}
    return nib.Nifti1Image.from_bytes(gzip.decompress(parts["image"])), json.loads(parts["params"])


def _labels(image: nib.Nifti1Image, result: dict) -> np.ndarray:
    """The label map, checked against the per-organ summary that came with it."""
    labels = np.asarray(image.dataobj)
    for organ, row in result["organs"].items():
        assert row["voxels"] == int((labels == row["label"]).sum()) and row["present"] == (row["voxels"] > 0)
    return labels


@needs_label_env
def test_info_lists_the_cards_organs_as_the_models_labels(served):
    model = served["info"]["models"]["medclipsam"]
    card = load_card("phantom")
    assert model["config"]["organs"] == ""  # an option 3D Slicer shows: organ names to type
    assert model["labels"] == {**{name: card.resolve(name).label_id for name in card.names()}, "background": 0}
    assert model["type"] == "deepedit" and set(card.names()) <= set(served["info"]["labels"])


@needs_label_env
def test_organs_by_name_then_a_box_and_clicks_refine_only_the_liver(served):
    image, text = _infer(served, {"organs": list(ORGANS)})
    assert image.shape == served["image"].shape and np.array_equal(image.affine, served["image"].affine)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    first = _labels(image, text)
    assert set(np.unique(first)) <= {0, *ORGANS.values()}
    assert all(text["organs"][organ]["present"] for organ in ORGANS), text
    assert text["refined"] == [] and not text["reused_encodings"] and text["organs"]["liver"]["label"] == 1

    xs, ys = np.nonzero(served["label"][..., 3] == ORGANS["liver"])  # the liver's outline on slice 3, file voxels
    box = [int(xs.min()), int(ys.min()), 2, int(xs.max()), int(ys.max()), 3]
    image, boxed = _infer(served, {"organ": "liver", "box": box})
    second = _labels(image, boxed)
    assert boxed["refined"] == ["liver"] and boxed["reused_encodings"], boxed
    np.testing.assert_array_equal(second == ORGANS["spleen"], first == ORGANS["spleen"])
    liver = second == ORGANS["liver"]
    assert liver.any() and not np.array_equal(liver, first == ORGANS["liver"])
    assert set(np.flatnonzero(liver.any(axis=(0, 1)))) <= {2, 3}  # a box replaces the organ: its slices only

    picks = np.linspace(0, len(xs) - 1, 5).astype(int)
    image, clicked = _infer(served, {"liver": [[int(xs[i]), int(ys[i]), 3] for i in picks]})
    third = _labels(image, clicked)
    assert clicked["refined"] == ["liver"] and clicked["reused_encodings"], clicked
    np.testing.assert_array_equal(third == ORGANS["spleen"], second == ORGANS["spleen"])
    others = np.arange(third.shape[2]) != 3
    np.testing.assert_array_equal(third[..., others], second[..., others])  # clicks redo their slice only


@needs_label_env
def test_a_request_it_cannot_use_gets_the_reason(served):
    with pytest.raises(urllib.error.HTTPError) as raised:
        _infer(served, {"organs": ["livr"]})
    assert raised.value.code == 422
    assert "'livr' names no organ of card 'phantom' (close: 'liver')" in json.loads(raised.value.read())["detail"]
