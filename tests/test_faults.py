"""Fault battery (issue 15): `medclipsam segment` (and `train` for datalists and --quiet) run as a subprocess the way a
hostile but realistic user runs it. Every case asserts the exit code, the message (key words), no traceback, and that
nothing partial or foreign was touched: inputs are unchanged byte for byte (checked around every test), nothing is
written through a link, and OUT holds only what the command documents.

Kept fast: argument and --out faults stop before torch loads (well under a second each); runs that need the heavy
libraries go in parallel; real segmentation uses 32 x 32 x 8 phantoms and a tiny untrained model."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medclipsam.data.phantom import make_phantom
from medclipsam.inference.output_folder import LOCK_FILE, lock_output

from helpers_scans import (
    ENV, contents, listing, run_cli, sitk_image, tiny_model, write_bad_scans, write_dicom_series,
)

GRID = {"shape": (32, 32, 8), "spacing": (12.0, 12.0, 24.0)}
RESULT = ["labels.nii.gz", "report.csv", "report.json"]
BAD_SCANS = {  # file or folder that `write_bad_scans` writes -> key words of its message
    "empty.nii.gz": ["unreadable or truncated", "Empty file"],
    "truncated.nii.gz": ["unreadable or truncated"],
    "text.nii.gz": ["unreadable or truncated", "not a gzip file"],
    "flat.nii.gz": ["2D image", "a 3D volume is expected"],
    "series.nii.gz": ["4D image", "holding 2 volumes"],
    "nan.nii.gz": ["1 NaN and 0 infinite"],
    "inf.nii.gz": ["0 NaN and 1 infinite"],
    "one_slice": ["single slice"],
    "two_series": ["holds 2 DICOM series", "into its own folder"],
}


@dataclass
class Run:
    """What a CLI subprocess did."""

    code: int
    out: str
    err: str

    def expect(self, code: int) -> str:
        """Its stderr, once checked: the exit code `code`, and no traceback whatever happened."""
        assert self.code == code and "Traceback" not in self.err, f"exit {self.code}\n{self.err}"
        return self.err


def finished(process: subprocess.Popen, timeout: float = 300) -> Run:
    out, err = process.communicate(timeout=timeout)
    return Run(process.returncode, out, err)


def segment(*args: str) -> Run:
    return finished(run_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE))


def in_parallel(commands: dict[str, list[str]], at_once: int = 3) -> dict[str, Run]:
    """Run `medclipsam` command lines a few at a time (each loads torch and MONAI: seconds of CPU)."""
    runs: dict[str, Run] = {}
    names = list(commands)
    for start in range(0, len(names), at_once):
        started = {name: subprocess.Popen([sys.executable, "-m", "medclipsam.cli", *commands[name]], env=ENV,
                                          text=True, encoding="utf-8", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for name in names[start:start + at_once]}
        runs.update({name: finished(process) for name, process in started.items()})
    return runs


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("medclipsam: error:")]


def _write_models(models: Path) -> Path:
    """A tiny untrained checkpoint, and broken ones beside it; returns the good one."""
    good = tiny_model(models / "tiny")
    weights = (good / "weights.safetensors").read_bytes()
    (models / "empty_config").mkdir()  # an adapter folder of before the common format, its config emptied
    (models / "empty_config" / "config.json").write_text("{}")
    (models / "empty_config" / "adapters.safetensors").write_bytes(weights)
    (models / "no_config").mkdir()
    (models / "no_config" / "weights.safetensors").write_bytes(weights)
    (models / "truncated").mkdir()
    (models / "truncated" / "method.json").write_bytes((good / "method.json").read_bytes())
    (models / "truncated" / "weights.safetensors").write_bytes(weights[:1000])
    (models / "weights.pt").write_bytes(b"not a folder")
    return good


def _write_datalists(folder: Path, scan: Path, truth: Path) -> None:
    folder.mkdir()
    lists = {
        "no_label": {"training": [{"image": str(scan)}]},
        "missing_image": {"training": [{"image": "gone.nii.gz", "label": str(truth)}]},
        "labelled": {"training": [{"image": str(scan), "label": str(truth)}]},
    }
    for name, content in lists.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    (folder / "not_json.json").write_text('{"training": [')


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs under one folder (checked unchanged around every test): phantom scans, bad scans, models, datalists."""
    root = tmp_path_factory.mktemp("faults")
    given = root / "in"
    (given / "one").mkdir(parents=True)
    make_phantom(1, **GRID).to_nifti(given / "one" / "ct.nii.gz", given / "truth.nii.gz")
    (given / "many").mkdir()
    for seed in range(2, 8):
        make_phantom(seed, **GRID).to_nifti(given / "many" / f"ct{seed}.nii.gz", root / f"truth{seed}.nii.gz")
    write_bad_scans(given / "bad", given / "one" / "ct.nii.gz")
    (given / "models").mkdir()
    model = _write_models(given / "models")
    _write_datalists(given / "datalists", given / "one" / "ct.nii.gz", given / "truth.nii.gz")
    (given / "notes.txt").write_text("not a folder\n")
    return {"root": root, "in": given, "one": given / "one", "many": given / "many", "bad": given / "bad",
            "model": model, "models": given / "models", "datalists": given / "datalists"}


@pytest.fixture(autouse=True)
def inputs_untouched(files):
    """No test may change, add or remove anything among the inputs."""
    before = contents(files["in"])
    yield
    assert contents(files["in"]) == before


ARGUMENT_FAULTS = {  # name -> (arguments after the scan, key words of the message)
    "box-not-finite": (["--prompt", "liver", "--box", "liver=1e300,2,3,inf,nan,1e308"],
                       ["value 1 '1e300' is too large", "value 4 'inf' is infinite", "value 5 'nan' is not a number",
                        "value 6 '1e308' is too large", "e.g. --box 'liver=10,20,5,60,80,25'"]),
    "box-count": (["--prompt", "liver", "--box", "liver=1,2,3,4,5"], ["needs 6 numbers (X0,Y0,Z0,X1,Y1,Z1), got 5"]),
    "box-not-a-number": (["--prompt", "liver", "--box", "liver=1,2,x,4,5,6"], ["value 3 'x' is not a number"]),
    "point-count": (["--prompt", "liver", "--point", "liver=4,5"],
                    ["needs 3 numbers (X,Y,Z), got 2", "e.g. --point 'liver=40,50,12'"]),
    "box-other-organ": (["--prompt", "liver", "--box", "spleen=1,1,1,5,5,5"], ["'spleen', which no --prompt asks for"]),
    "batch-size": (["--prompt", "liver", "--batch-size", "0"], ["--batch-size 0 must be at least 1"]),
    "card": (["--prompt", "liver", "--card", "nosuch"], ["no such concept card", "phantom"]),
    "prompt-empty": (["--prompt", ""], ["--prompt '': is empty", "its organs are 'liver', 'spleen'", "nothing to do"]),
    "prompt-unmatched": (["--prompt", "xyzzy"], ["--prompt 'xyzzy': names no organ of card 'phantom'",
                                                 "its organs are 'liver'", "nothing to do"]),
    "prompt-close": (["--prompt", "livr"], ["unknown concept 'livr'", "Did you mean: 'liver'", "nothing to do"]),
}


@pytest.mark.parametrize("name", ARGUMENT_FAULTS)
def test_argument_faults_stop_at_once_writing_nothing(files, tmp_path, name):
    arguments, words = ARGUMENT_FAULTS[name]
    err = segment(str(files["one"]), *arguments, "--out", str(tmp_path / "out")).expect(2)
    assert error_lines(err) == err.splitlines() and all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, words", [
    ("missing", ["--model folder does not exist", "Pass the model/ folder"]),
    ("weights.pt", ["--model is a file; it takes a checkpoint folder"]),
])
def test_model_paths_that_are_no_folder_stop_at_once(files, tmp_path, model, words):
    err = segment(str(files["one"]), "--prompt", "liver", "--model", str(files["models"] / model),
                  "--out", str(tmp_path / "out")).expect(2)
    assert all(w in err for w in words) and "safetensors" not in err, err
    assert not (tmp_path / "out").exists()


def _unwritable(tmp_path: Path) -> Path:
    """An existing folder this process cannot write to (root writes anywhere on a normal file system: /sys)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/sys/kernel").is_dir():
        pytest.skip("needs a read-only folder: run as a normal user, or on Linux with /sys")
    return Path("/sys/kernel")


@pytest.mark.parametrize("case", ["file", "input", "inside-input", "broken-link", "under-a-file", "not-creatable",
                                  "not-writable"])
def test_unusable_out_stops_before_any_work(files, tmp_path, case):
    out = {
        "file": files["in"] / "notes.txt", "input": files["one"], "inside-input": files["one"] / "results",
        "broken-link": tmp_path / "link", "under-a-file": files["in"] / "notes.txt" / "out",
        "not-creatable": _unwritable(tmp_path) / "out", "not-writable": _unwritable(tmp_path),
    }[case]
    if case == "broken-link":
        out.symlink_to(tmp_path / "nowhere")
    words = {
        "file": "--out is an existing file, not a folder", "input": f"--out is the input folder {files['one']}",
        "inside-input": f"--out lies inside the input folder {files['one']}",
        "broken-link": "--out is a broken symbolic link", "under-a-file": "--out cannot be created (Not a directory)",
        "not-creatable": "--out cannot be created", "not-writable": "--out is not writable",
    }[case]
    before = contents(tmp_path)
    err = segment(str(files["one"]), "--prompt", "liver", "--model", str(files["model"]), "--out", str(out)).expect(2)
    assert words in err and len(error_lines(err)) == 1, err
    assert contents(tmp_path) == before and not (tmp_path / "nowhere").exists()


def test_second_run_into_the_same_out_stops_naming_the_first(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = lock_output(out)  # this test process is "the first run"
    try:
        run = segment(str(files["one"]), "--prompt", "liver", "--model", str(files["model"]), "--out", str(out))
        assert listing(out) == [LOCK_FILE]
    finally:
        lock.release()
    err = run.expect(2)
    for words in ("--out is in use by another medclipsam segment run", f"pid {os.getpid()}",
                  f"on host {socket.gethostname()}", "started 20", "Wait for it to finish"):
        assert words in err
    assert listing(out) == []


@pytest.fixture(scope="module")
def heavy_faults(files, tmp_path_factory) -> dict[str, tuple[Run, Path]]:
    """Segment faults found once torch and MONAI are loaded (unusable scans and models), run a few at a time."""
    root = tmp_path_factory.mktemp("heavy")
    commands = {"scans": ["segment", str(files["bad"]), str(files["in"] / "missing.nii.gz"), "--prompt", "liver",
                          "--model", str(files["model"])]}
    for model in ("empty_config", "no_config", "truncated"):
        commands[model] = ["segment", str(files["one"]), "--prompt", "liver", "--model", str(files["models"] / model)]
    outs = {name: root / name for name in commands}
    write_dicom_series(outs["scans"] / "dicom", sitk_image(np.zeros((8, 8, 4), np.int16), np.eye(4)))
    commands["scans"].insert(1, str(outs["scans"] / "dicom"))  # a scan inside OUT that its results would replace
    runs = in_parallel({name: [*command, "--out", str(outs[name])] for name, command in commands.items()})
    return {name: (run, outs[name]) for name, run in runs.items()}


def test_unusable_scans_fail_one_by_one_and_nothing_ran(files, heavy_faults):
    run, out = heavy_faults["scans"]
    lines = error_lines(run.expect(2))
    assert len(lines) == len(BAD_SCANS) + 2
    for name, words in BAD_SCANS.items():
        line = next(line for line in lines if f"{files['bad'] / name}:" in line)
        assert all(word in line for word in words), line
    assert any(f"{files['in'] / 'missing.nii.gz'}: does not exist" in line for line in lines)
    assert any(f"{out / 'dicom'}: its output folder {out / 'dicom'} would replace an input" in line for line in lines)
    assert "0 done, 0 already done, 11 failed" in run.err
    saved = summary(out)
    assert saved["exit_code"] == 2 and saved["done"] == [] and len(saved["failed"]) == len(BAD_SCANS) + 2
    assert listing(out) == ["dicom", "dicom/42-000.dcm", "dicom/42-001.dcm", "dicom/42-002.dcm", "dicom/42-003.dcm",
                            "summary.json"]


@pytest.mark.parametrize("model, words", [
    ("empty_config", ["config.json: holds no 'model' settings, so it is not a medclipsam model config"]),
    ("no_config", ["no_config: holds no trained model (method.json is missing)"]),
    ("truncated", ["weights.safetensors: unreadable or truncated safetensors file"]),
])
def test_unusable_models_stop_before_any_scan(heavy_faults, model, words):
    run, out = heavy_faults[model]
    err = run.expect(2)
    assert all(w in err for w in words) and "('model')" not in err, err
    assert summary(out)["failed"][0]["input"] == "model" and listing(out) == ["summary.json"]


@pytest.fixture(scope="module")
def train_runs(files, tmp_path_factory) -> dict[str, tuple[Run, Path]]:
    """`medclipsam train` on unusable datalists, and a tiny `train --quiet`, run a few at a time."""
    root, lists = tmp_path_factory.mktemp("train"), files["datalists"]
    tiny = ["--sam", "tiny_vit", "--vision-language-options", '{"sam_channels": 32}', "--steps", "1"]
    commands = {name: ["train", "--datalist", str(lists / f"{name}.json"), *tiny]
                for name in ("no_label", "not_json", "missing_image")}
    commands["quiet"] = ["train", "--datalist", str(lists / "labelled.json"), *tiny, "--similarity-steps", "1",
                         "--pairs-per-step", "1", "--slice-step", "4", "--quiet"]
    runs = in_parallel({name: [*command, "--out", str(root / name)] for name, command in commands.items()})
    return {name: (run, root / name) for name, run in runs.items()}


@pytest.mark.parametrize("datalist, words", [
    ("no_label", ["error: ct: ", "no label"]),  # the entry is named by its case id
    ("not_json", ["not_json.json: datalist is not valid JSON"]),
    ("missing_image", ["image file", "gone.nii.gz", "does not exist"]),
])
def test_unusable_datalists_are_named(train_runs, datalist, words):
    err = train_runs[datalist][0].expect(2)
    assert len(error_lines(err)) == 1 and all(w in err for w in words) and "volume_slices" not in err, err


def test_train_quiet_is_quiet(train_runs):
    run, out = train_runs["quiet"]
    assert run.expect(0) == ""
    assert (out / "model").is_dir()


def _scans_and_linked_out(files, tmp_path: Path) -> tuple[list[str], Path, Path]:
    """Two scans whose result folders are links: one dangling, one to a foreign folder. Returns the arguments of a
    quiet run, OUT and the foreign folder."""
    scans, out, foreign = tmp_path / "scans", tmp_path / "out", tmp_path / "foreign"
    scans.mkdir()
    for name in ("dangling", "linked"):
        (scans / f"{name}.nii.gz").write_bytes((files["one"] / "ct.nii.gz").read_bytes())
    foreign.mkdir()
    (foreign / "report.json").write_text("someone else's\n")
    out.mkdir()
    (out / "dangling").symlink_to(tmp_path / "nowhere")
    (out / "linked").symlink_to(foreign)
    return [str(scans), "--prompt", "liver", "--model", str(files["model"]), "--out", str(out), "--quiet"], out, foreign


def test_links_at_scan_folders_are_refused_without_overwrite(files, tmp_path):
    arguments, out, foreign = _scans_and_linked_out(files, tmp_path)
    err = segment(*arguments).expect(2)
    for name, target in (("dangling", tmp_path / "nowhere"), ("linked", foreign)):
        assert f"{out / name}: is a symbolic link (to {target}), not a result folder" in err
    assert "pass --overwrite to replace it (a link's target is left alone)" in err
    assert listing(out) == ["dangling", "linked", "summary.json"] and (out / "linked").is_symlink()
    assert listing(foreign) == ["report.json"] and not (tmp_path / "nowhere").exists()


def test_links_at_scan_folders_are_replaced_with_overwrite_never_written_through(files, tmp_path):
    arguments, out, foreign = _scans_and_linked_out(files, tmp_path)
    assert segment(*arguments, "--overwrite").expect(0) == ""  # --quiet: nothing, not even library warnings
    assert listing(out) == sorted(["summary.json", "dangling", "linked",
                                   *(f"{n}/{f}" for n in ("dangling", "linked") for f in RESULT)])
    assert not (out / "linked").is_symlink() and listing(foreign) == ["report.json"]
    assert (foreign / "report.json").read_text() == "someone else's\n" and not (tmp_path / "nowhere").exists()


def _wait_for_lock(out: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the run has locked `out` (its pid is in the lock file)."""
    deadline = time.monotonic() + timeout
    while f'"pid": {process.pid},' not in ((out / LOCK_FILE).read_text() if (out / LOCK_FILE).exists() else ""):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it locked --out"
        time.sleep(0.005)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_while_loading_writes_one_line_and_a_summary(files, tmp_path, signal_number):
    out = tmp_path / "out"
    process = run_cli(str(files["many"]), "--prompt", "liver", "--model", str(files["model"]), "--out", str(out),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_lock(out, process)  # --out is checked and locked: torch and MONAI are loading now
    process.send_signal(signal_number)
    err = finished(process).expect(130)
    assert err.splitlines() == [f"medclipsam segment: interrupted (0 done, 0 already done, 0 failed; results in "
                                f"{out}); re-run the same command to finish the scans not done yet"]
    assert summary(out) == {"done": [], "skipped": [], "interrupted": True, "failed": [], "exit_code": 130}
    assert listing(out) == ["summary.json"]


def _interrupted_after(arguments: list[str], signal_number: int, scans: int) -> Run:
    """Run a batch and interrupt it once it has printed `scans` label map paths (done or already done)."""
    process = run_cli(*arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    printed = [process.stdout.readline() for _ in range(scans)]
    assert all(line.endswith("labels.nii.gz\n") for line in printed), process.communicate()[1]
    process.send_signal(signal_number)
    return finished(process)


def test_interrupted_batch_resumes_and_cleans_up_after_killed_runs(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = {"pid": 2 ** 22 + 1, "host": socket.gethostname(), "started": "2020-01-01 00:00:00"}
    (out / LOCK_FILE).write_text(json.dumps(dead))  # a lock file a killed run left: no process holds it
    (out / f".partial-{dead['pid']}-x").mkdir()
    (out / f".partial-{dead['pid']}-x" / "labels.nii.gz").write_bytes(b"half")
    (out / ".summary.json.x.tmp").write_text("{")
    missing = str(files["in"] / "missing.nii.gz")
    arguments = [str(files["many"]), missing, "--prompt", "liver", "--model", str(files["model"]), "--out", str(out)]
    scans = sorted(p.name.removesuffix(".nii.gz") for p in files["many"].iterdir())

    assert "interrupted (1 done" in _interrupted_after(arguments, signal.SIGTERM, scans=1).expect(130)
    done = summary(out)["done"]
    assert summary(out)["interrupted"] and len(done) == 1
    assert listing(out) == sorted(["summary.json", *done, *(f"{d}/{f}" for d in done for f in RESULT)])

    second = _interrupted_after(arguments, signal.SIGINT, scans=2)  # one already done, one new
    assert "interrupted (1 done, 1 already done" in second.expect(130)
    done += summary(out)["done"]

    err = segment(*arguments).expect(1)  # the missing scan failed, every other scan is done
    saved = summary(out)
    assert sorted(saved["skipped"]) == sorted(done) and sorted(saved["done"] + saved["skipped"]) == scans
    assert [f["input"] for f in saved["failed"]] == [missing] and saved["exit_code"] == 1
    assert listing(out) == sorted(["summary.json", *scans, *(f"{s}/{f}" for s in scans for f in RESULT)])
    assert "Warning" not in err and "it/s" not in err  # no library noise, no bar in a log
