"""Hostile and unlucky files: nothing read outside the model's folder, no input destroyed, no output that
is half-written or paired with another run's data, no traceback, and the exit codes CI relies on."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx_models import assert_same_outputs

from bnfold.cli import main
from bnfold.errors import InputError
from bnfold.onnx_fold.io import load_model

EXAMPLE = Path(__file__).parent.parent / "examples" / "small_cnn.onnx"
BNFOLD = Path(sys.executable).with_name("bnfold")


def invoke(*args, cwd: Path | None = None):
    """The CLI in this process (from ``cwd`` when given): exit code and everything it printed."""
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(previous)
    return result.exit_code, result.output


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_external_data(folder: Path, name: str = "model.onnx", location: str = "model.onnx.data") -> Path:
    """The bundled example saved in ``folder`` with every tensor in the data file ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(onnx.load(EXAMPLE), path, save_as_external_data=True, location=location, size_threshold=0)
    return path


def point_tensor_at(model_path: Path, location: str) -> None:
    """Make the first external tensor of ``model_path`` read ``location`` instead (a crafted model)."""
    proto = onnx.load(model_path, load_external_data=False)
    tensor = proto.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
        if entry.key == "offset":
            entry.value = "0"
    onnx.save(proto, model_path)


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the model's folder that a crafted model tries to read."""
    path = tmp_path / "outside.bin"
    path.write_bytes(b"SECRET" * 4096)
    return path


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_models_folder_is_refused_and_never_read(tmp_path, secret, how):
    model = with_external_data(tmp_path / "model")
    location = {"parent": "../outside.bin", "absolute": str(secret), "symlink": "link.bin"}[how]
    if how == "symlink":
        (tmp_path / "model" / "link.bin").symlink_to(secret)
    point_tensor_at(model, location)
    for given, cwd in (("model.onnx", tmp_path / "model"), (str(model), None)):  # a bare name and a path
        code, output = invoke(given, "-o", tmp_path / "out.onnx", "--no-verify", cwd=cwd)
        assert code == 2, output
        assert "leaves the model's folder" in output and output.count("\n") == 1
        assert not (tmp_path / "out.onnx").exists()
        assert not any(p.name.endswith(".data") for p in tmp_path.iterdir())
    code, output = invoke("check", "model.onnx", cwd=tmp_path / "model")
    assert code == 2 and "leaves the model's folder" in output and "SECRET" not in output
    with pytest.raises(InputError, match="leaves the model's folder"):
        load_model(model)


def set_external_field(model_path: Path, key: str, value: str) -> None:
    """Set ``key`` of the first external tensor of ``model_path`` to ``value`` (a crafted model)."""
    proto = onnx.load(model_path, load_external_data=False)
    entries = proto.graph.initializer[0].external_data
    entry = next((entry for entry in entries if entry.key == key), None) or entries.add(key=key)
    entry.value = value
    onnx.save(proto, model_path)


@pytest.mark.parametrize(
    "field,problem",
    [(("length", "4"), "has length 4, but the tensor takes"),  # (onnx_ir read the tensor's size anyway: exit 0)
     (("offset", "-16"), "external data offset '-16' of tensor"),  # (these three: onnx_ir's SerdeError, naming nothing)
     (("offset", "abc"), "external data offset 'abc' of tensor"),
     (("length", "-1"), "external data length '-1' of tensor"),
     ("directory", "is not a regular file"),  # (these two said "is missing")
     ("fifo", "is not a regular file"),
     ("long name", "cannot be looked up (file name too long)"),  # (these two: an internal error)
     ("symlink loop", "cannot be looked up (too many levels of symbolic links)")],
    ids=["short length", "negative offset", "offset not a number", "negative length", "directory", "fifo", "long name", "symlink loop"],
)  # fmt: skip
def test_external_data_that_does_not_hold_its_tensor_is_refused_saying_which_and_why(tmp_path, field, problem):
    """onnx and onnxruntime refuse each of these models; bnfold did not, or said something else."""
    model = with_external_data(tmp_path / "model")
    if field == "directory":
        (tmp_path / "model" / "folder").mkdir()
        point_tensor_at(model, "folder")
    elif field == "fifo":
        os.mkfifo(tmp_path / "model" / "pipe.data")
        point_tensor_at(model, "pipe.data")
    elif field == "long name":
        point_tensor_at(model, "x" * 300)
    elif field == "symlink loop":
        (tmp_path / "model" / "one").symlink_to("two")
        (tmp_path / "model" / "two").symlink_to("one")
        point_tensor_at(model, "one")
    else:
        set_external_field(model, *field)
    code, output = invoke(model, "-o", tmp_path / "out.onnx")
    assert code == 2 and output.count("\n") == 1 and f"{model}: " in output and problem in output, output
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(InputError, match=re.escape(problem)):
        load_model(model)


@pytest.mark.parametrize("command", ["fold", "output", "verify", "check", "check-pt"])
def test_a_name_too_long_for_the_system_is_bad_input_not_a_traceback(tmp_path, command):
    """The group's routing looked the name up with pathlib, which raises for it: a traceback and exit 1; the
    commands reported an internal error."""
    long = "x" * 300
    arguments = {
        "fold": [f"{long}.onnx", "-o", tmp_path / "out.onnx"],
        "output": [EXAMPLE, "-o", tmp_path / f"{long}.onnx"],
        "verify": ["verify", f"{long}.onnx", EXAMPLE],
        "check": ["check", f"{long}.onnx"],
        "check-pt": ["check", tmp_path / f"{long}.pt"],
    }[command]
    code, output = invoke(*arguments, cwd=tmp_path)
    assert code == 2 and "cannot be looked up (file name too long)" in output and "internal error" not in output, output
    assert "Traceback" not in output and list(tmp_path.iterdir()) == []


def function_with_external_constant(folder: Path, location: str) -> Path:
    """A Conv -> BN in a model-local function whose Conv weight is a Constant read from the external file ``location``
    (9 uint8 bytes, cast and reshaped to [3, 3, 1, 1])."""
    weight = onnx.TensorProto(name="raw", data_type=TensorProto.UINT8, dims=[9], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "9")):
        weight.external_data.add(key=key, value=value)
    statistics = [onnx.numpy_helper.from_array(np.full(3, value, np.float32), name) for name, value in (("s", 1.5), ("b", 0.2), ("m", 0.1), ("v", 2.0))]
    function = helper.make_function("local", "Layer", ["x", "s", "b", "m", "v"], ["z"], [
        helper.make_node("Constant", [], ["raw"], value=weight),
        helper.make_node("Cast", ["raw"], ["flat"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["shape"], value=onnx.numpy_helper.from_array(np.array([3, 3, 1, 1], np.int64))),
        helper.make_node("Reshape", ["flat", "shape"], ["W"]),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        helper.make_node("BatchNormalization", ["y", "s", "b", "m", "v"], ["z"], name="bn"),
    ], [helper.make_opsetid("", 17)])  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Layer", ["x", "s", "b", "m", "v"], ["z"], domain="local", name="layer")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 4, 4])],
        statistics,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[function])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    return folder / "model.onnx"


def test_a_functions_external_constant_is_read_from_the_models_folder_only(tmp_path):
    """A function's Constant with external data was read relative to the working directory, not the model's folder:
    run from a folder holding that name, the fold copied the file's bytes into its output weights."""
    model = function_with_external_constant(tmp_path / "model", "secret.bin")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "secret.bin").write_bytes(b"SECRET!!!")
    output = tmp_path / "out.onnx"
    code, printed = invoke(model, "-o", output, "--no-verify", cwd=tmp_path / "cwd")
    assert code == 2 and "external data file 'secret.bin' of tensor 'raw' is missing" in printed, printed
    assert not output.exists()
    (tmp_path / "model" / "secret.bin").write_bytes(bytes(range(1, 10)))  # the model's own data: read from there
    code, printed = invoke(model, "-o", output, cwd=tmp_path / "cwd")
    assert code == 0, printed
    folded = onnx.load(output)
    weight = next(tensor for tensor in folded.graph.initializer if list(tensor.dims) == [3, 3, 1, 1])
    scale = 1.5 / np.sqrt(2.0 + 1e-5)
    np.testing.assert_allclose(onnx.numpy_helper.to_array(weight).reshape(-1), np.arange(1, 10) * scale, rtol=1e-6)


def test_output_onto_the_inputs_data_file_is_refused(tmp_path):
    model = with_external_data(tmp_path)
    data = tmp_path / "model.onnx.data"
    before = digest(data)
    code, output = invoke(model, "-o", data, "--no-verify")
    assert code == 2 and "which the model is read from" in output
    assert digest(data) == before
    assert_same_outputs(onnx.load(EXAMPLE), onnx.load(model), atol=0, rtol=0)


def test_output_named_like_the_inputs_data_never_replaces_it(tmp_path):
    """`mv model.onnx orig.onnx; bnfold orig.onnx -o model.onnx`: orig's data file is model.onnx.data."""
    with_external_data(tmp_path)
    original = tmp_path / "orig.onnx"
    (tmp_path / "model.onnx").rename(original)
    before = digest(tmp_path / "model.onnx.data")
    code, output = invoke(original, "-o", tmp_path / "model.onnx")
    assert code == 0, output
    assert digest(tmp_path / "model.onnx.data") == before
    assert_same_outputs(onnx.load(EXAMPLE), onnx.load(original), atol=0, rtol=0)
    assert_same_outputs(onnx.load(EXAMPLE), onnx.load(tmp_path / "model.onnx"), atol=1e-5, rtol=1e-4)


def test_rewriting_an_output_replaces_its_data_file_and_leaves_no_other(tmp_path):
    model = with_external_data(tmp_path / "in")
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    for _ in range(3):
        code, output = invoke(model, "-o", out)
        assert code == 0, output
    names = sorted(p.name for p in out.parent.iterdir())
    assert len(names) == 2 and names[0] == "folded.onnx" and names[1].endswith(".data")
    assert_same_outputs(onnx.load(EXAMPLE), onnx.load(out), atol=1e-5, rtol=1e-4)


def test_in_place_with_external_data_removes_the_replaced_data_file(tmp_path):
    model = with_external_data(tmp_path)
    code, output = invoke(model, "--in-place")
    assert code == 0, output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "model.onnx" and names[1].startswith("model.onnx.") and names[1] != "model.onnx.data"
    assert_same_outputs(onnx.load(EXAMPLE), onnx.load(model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("location", ["out.onnx.data", "sub/../out.onnx.data"])
def test_data_files_of_other_models_are_never_removed(tmp_path, location):
    """An existing output whose data file is also an input's, whatever the input calls it (a path through a
    folder and back): replacing the output must not delete it."""
    shared = with_external_data(tmp_path, name="out.onnx", location="out.onnx.data")
    (tmp_path / "sub").mkdir()
    model = tmp_path / "model.onnx"
    shutil.copy(shared, model)  # reads out.onnx.data as well
    if location != "out.onnx.data":
        proto = onnx.load(model, load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                entry.value = location if entry.key == "location" else entry.value
        onnx.save(proto, model)
    before = digest(tmp_path / "out.onnx.data")
    code, output = invoke(model, "-o", shared)
    assert code == 0, output
    assert digest(tmp_path / "out.onnx.data") == before
    assert_same_outputs(onnx.load(EXAMPLE), onnx.load(model), atol=0, rtol=0)


def test_replacing_an_output_parses_an_inline_input_once(tmp_path, monkeypatch):
    """save_model's list of the input's files comes from the load, not a second parse of the input; a file
    changed since the load is parsed again (its data file then counts)."""
    from bnfold.onnx_fold import io

    model, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    shutil.copy(EXAMPLE, model)
    shutil.copy(EXAMPLE, out)
    parses = []
    real_read = io.read_model_proto
    monkeypatch.setattr(io, "read_model_proto", lambda path: parses.append(path) or real_read(path))
    code, output = invoke(model, "-o", out, "--no-verify")
    assert code == 0, output
    assert parses == [model]
    assert_same_outputs(onnx.load(EXAMPLE), onnx.load(out), atol=1e-5, rtol=1e-4)

    assert io.model_files(model) == {model.absolute()}
    with_external_data(tmp_path)  # rewrites model.onnx: a new identity, so a new parse names its data file
    assert io.model_files(model) == {model.absolute(), (tmp_path / "model.onnx.data").absolute()}


def test_a_model_is_read_as_onnx_load_reads_it_binary_or_text(tmp_path):
    """read_model_proto parses a binary file from a memory map and a text-format one (by its extension, as
    onnx.load decides) through onnx.load: the same model either way."""
    from bnfold.onnx_fold.io import read_model_proto

    expected = onnx.load(EXAMPLE)
    assert read_model_proto(EXAMPLE) == expected
    text = tmp_path / "model.textproto"
    onnx.save(expected, text, format="textproto")
    assert read_model_proto(text) == expected
    code, output = invoke(text, "-o", tmp_path / "out.onnx", "--no-verify")
    assert code == 0 and "folded 4 of 4" in output, output


@pytest.mark.parametrize("special", ["fifo", "device"])
def test_output_onto_a_fifo_or_device_is_refused(tmp_path, special):
    if special == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
    else:
        target = Path("/dev/null")
    code, output = invoke(EXAMPLE, "-o", target, "--no-verify")
    assert code == 2 and "not a regular file" in output
    assert not target.is_file() and target.exists()


def scratch_of(folder: Path, name: str) -> Path:
    """A scratch directory as a bnfold run leaves it when killed: its marker file and a half-written file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).mkdir()
    (folder / name / ".bnfold-scratch").touch()
    (folder / name / "model.onnx").write_bytes(b"half")
    return folder / name


def test_stale_staging_and_scratch_directories_of_dead_runs_are_removed(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_staging = scratch_of(tmp_path, f".bnfold-staging-{dead.pid}-abc123")
    live_staging = scratch_of(tmp_path, f".bnfold-staging-{os.getpid()}-def456")  # a run still going: left alone
    temporary = tmp_path / "tmp"
    scratch_of(temporary, f"bnfold-verify-{dead.pid}-ghi789")
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # where verification keeps its scratch files
    code, output = invoke(EXAMPLE, "-o", tmp_path / "folded.onnx")
    assert code == 0, output
    assert not stale_staging.exists() and live_staging.exists()
    assert list(temporary.iterdir()) == []


def test_folders_named_like_scratch_directories_are_never_removed(tmp_path, monkeypatch):
    """Only a directory holding bnfold's marker file is scratch: not a user's folder named alike, nor a symlink to one."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    kept = [tmp_path / "bnfold-runs-20240101-final", tmp_path / f"bnfold-verify-{dead.pid}-results"]
    for folder in kept:
        folder.mkdir()
        (folder / "results.txt").write_text("precious")
    elsewhere = scratch_of(tmp_path / "elsewhere", "target")
    (tmp_path / f".bnfold-staging-{dead.pid}-abcd1234").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, output = invoke(EXAMPLE, "-o", tmp_path / "folded.onnx")
    assert code == 0, output
    assert all((folder / "results.txt").read_text() == "precious" for folder in kept)
    assert (elsewhere / "model.onnx").exists()


def model_failing_the_checker(problem: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    reads = "undefined" if problem == "dangling" else "x"
    graph = helper.make_graph([helper.make_node("Relu", [reads], ["y"])], "g", [x], [y])
    if problem == "no-opset":
        return helper.make_model(graph, opset_imports=[])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("problem", ["dangling", "no-opset"])
def test_a_model_the_onnx_checker_rejects_is_bad_input(tmp_path, problem):
    path = tmp_path / "bad.onnx"
    onnx.save(model_failing_the_checker(problem), path)
    code, output = invoke(path, "-o", tmp_path / "out.onnx")
    assert code == 2 and "not a valid ONNX model" in output and output.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()


def test_mistyped_commands_are_named_not_folded():
    code, output = invoke("chekc", "m.onnx")
    assert code == 2 and "did you mean 'check'" in output
    code, output = invoke("help")
    assert code == 0 and "Commands:" in output


def test_negative_seed_is_a_usage_error():
    code, output = invoke(EXAMPLE, "--dry-run", "--seed", "-1")
    assert code == 2 and "--seed" in output


def ours(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.name.startswith("bnfold-")]


def test_interrupt_exits_130_in_one_line_and_removes_scratch_files(tmp_path):
    """A real SIGINT in the middle of verification (a large input keeps it busy)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    environment = {**os.environ, "TMPDIR": str(scratch)}
    process = subprocess.Popen(
        [BNFOLD, EXAMPLE, "--dry-run", "--input-shape", "input=50000,3,16,16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True,
        # A test runner (or CI) may have started us with SIGINT ignored, which a child inherits and Python
        # then respects: give the command the disposition an interactive shell gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ours(scratch) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # verification has started once its scratch directory exists
    assert process.poll() is None, "the run ended before verification started"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip() == "bnfold: interrupted"
    assert ours(scratch) == []


def endless_loop_model(path: Path) -> Path:
    """The example model with a side output from a Loop of 10**15 iterations: onnxruntime's run never returns."""
    model = onnx.load(EXAMPLE)
    body = helper.make_graph(
        [helper.make_node("Identity", ["condition_in"], ["condition_out"]), helper.make_node("Identity", ["carried_in"], ["carried_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("condition_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []), helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array(10**15, np.int64), "trips"),
        onnx.numpy_helper.from_array(np.array(True), "always"),
        onnx.numpy_helper.from_array(np.zeros(1, np.float32), "start"),
    ])  # fmt: skip
    model.graph.node.append(helper.make_node("Loop", ["trips", "always", "start"], ["carried"], body=body))
    model.graph.output.append(helper.make_tensor_value_info("carried", TensorProto.FLOAT, [1]))
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("command", [["{model}", "--dry-run"], ["check", "{model}"]], ids=["fold", "check"])
def test_a_run_that_never_ends_stops_on_sigterm_and_removes_its_scratch_files(tmp_path, command):
    """onnxruntime's run of an endless Loop never returned to Python: SIGINT and SIGTERM went unheard until SIGKILL,
    which left the scratch directory; then check's exit aborted (SIGABRT) on onnxruntime's threads."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    model = endless_loop_model(tmp_path / "loop.onnx")
    process = subprocess.Popen(
        [BNFOLD, *(str(part).format(model=model) for part in command)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(scratch)}, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + (60 if command[0] != "check" else 0)  # (check runs the model without scratch files)
        while not ours(scratch) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(3)  # (into the run)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip() == "bnfold: interrupted"
    assert ours(scratch) == []


def test_an_output_folder_that_refuses_new_files_is_bad_input():
    """/proc refuses new files even to root, for whom the up-front access check passes."""
    code, output = invoke(EXAMPLE, "-o", "/proc/folded.onnx", "--no-verify")
    assert code == 2 and output.count("\n") == 1
    assert output.startswith("bnfold: error: /proc/folded.onnx: ") and "internal error" not in output


def test_onnxruntimes_own_error_log_never_reaches_stderr(tmp_path):
    """A conv of group 0 passes onnx's checker and loads in onnxruntime, which then fails running it and logs
    the failure itself (in colour, at error level): only bnfold's one line is printed."""
    model = onnx.load(EXAMPLE)
    first_conv = next(node for node in model.graph.node if node.op_type == "Conv")
    for attribute in [a for a in first_conv.attribute if a.name == "group"]:
        first_conv.attribute.remove(attribute)
    first_conv.attribute.append(helper.make_attribute("group", 0))
    path = tmp_path / "group0.onnx"
    onnx.save(model, path)
    run = subprocess.run([BNFOLD, path, "-o", tmp_path / "out.onnx"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"bnfold: error: {path}: onnxruntime cannot run the original model")


def test_check_of_a_folder_with_a_symlink_loop_reports_it_unreadable(tmp_path):
    """Listing the folder resolved each name with Path.resolve, which raises for a loop: an internal error."""
    shutil.copy(EXAMPLE, tmp_path / "model.onnx")
    (tmp_path / "one.onnx").symlink_to("two.onnx")
    (tmp_path / "two.onnx").symlink_to("one.onnx")
    code, output = invoke("check", tmp_path)
    assert code == 2 and "internal error" not in output, output
    assert f"{tmp_path / 'one.onnx'}: cannot be looked up (too many levels of symbolic links)" in output
    assert "1 checked model(s), 2 unreadable" in output


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize(
    "arguments", [[EXAMPLE, "-o", "out.onnx"], ["--version"], ["--help"], ["verify", "--help"]], ids=["report", "version", "help", "verify help"]
)
def test_a_report_that_cannot_be_written_is_an_error_naming_stdout(tmp_path, arguments):
    """stdout on a full disk: the report's write failed as an internal error ("please report it"), as a command's
    --help did; click's own --version and --help raised a traceback, exit 1."""
    with open("/dev/full", "w") as full:
        run = subprocess.run([BNFOLD, *arguments], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr == "bnfold: error: <stdout>: cannot write (No space left on device)\n", run.stderr


def test_a_closed_stderr_changes_nothing(tmp_path):
    """stderr closed at start-up (``2>&-``): Python's ``sys.stderr`` is None, and verification's progress line asked
    it whether a person watches: an internal error, exit 2, nothing written."""
    run = subprocess.run(
        [BNFOLD, EXAMPLE, "-o", tmp_path / "out.onnx"], stdout=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(2)
    )
    assert run.returncode == 0 and "verification passed" in run.stdout and (tmp_path / "out.onnx").exists(), run.stdout


@pytest.mark.parametrize("output_format", ["text", "json"])
def test_an_unwritable_stderr_keeps_the_exit_code_and_the_json_error(tmp_path, output_format):
    """stderr open read-only (what a wrapper script run with ``2>&-`` can leave): writing the error line failed, the
    exit code became 1 (a verdict's) and the JSON error never reached stdout."""
    readable = tmp_path / "stderr"
    readable.write_text("")
    with open(readable, "rb") as unwritable:
        run = subprocess.run(
            [BNFOLD, tmp_path / "missing.onnx", "-o", tmp_path / "out.onnx", "--format", output_format],
            stdout=subprocess.PIPE, stderr=unwritable, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 2
    if output_format == "json":
        assert '"exit_code": 2' in run.stdout and "missing.onnx: no such file" in run.stdout


def test_a_constants_external_data_goes_with_the_folded_model_to_another_folder(tmp_path):
    """A Constant whose value is in the input's data file (onnx's convert_attribute=True) kept naming that file in
    the output, relative to the output's folder where it is not: exit 0, verification passed, and an output
    onnxruntime refuses ("External data path does not exist")."""
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((4, 8, 1, 1)), "s": rng.random(4) + 1, "b": rng.random(4), "m": rng.random(4), "v": rng.random(4) + 1}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
         helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(rng.standard_normal(600).astype(np.float32), "kv")),
         helper.make_node("Neg", ["k"], ["o"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4]), helper.make_tensor_value_info("o", TensorProto.FLOAT, [600])],
        [onnx.numpy_helper.from_array(array.astype(np.float32), name) for name, array in arrays.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0, convert_attribute=True)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    onnx.save(model, tmp_path / "in" / "m.onnx")
    code, output = invoke(tmp_path / "in" / "m.onnx", "-o", tmp_path / "out" / "f.onnx")
    assert code == 0, output
    assert not (tmp_path / "out" / "w.bin").exists()
    assert_same_outputs(onnx.load(tmp_path / "in" / "m.onnx"), onnx.load(tmp_path / "out" / "f.onnx"), atol=1e-5, rtol=1e-5)
