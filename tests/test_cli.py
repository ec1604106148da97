"""The `bnfold` command: outputs, exit codes 0/1/2, one-line errors, nothing lost or half-written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx_models import assert_same_outputs, op_count

from bnfold.cli import main

EXAMPLE = Path(__file__).parent.parent / "examples" / "small_cnn.onnx"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copy(EXAMPLE, path)
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_fold_writes_output_and_leaves_input_untouched(model, tmp_path):
    before = digest(model)
    out = tmp_path / "folded.onnx"
    result = invoke(model, "-o", out)
    assert result.exit_code == 0, result.output
    assert digest(model) == before
    folded = onnx.load(out)
    assert op_count(folded, "BatchNormalization") == 0
    assert_same_outputs(onnx.load(model), folded, atol=1e-5, rtol=1e-4)
    assert "folded 4 of 4 BatchNorm(s)" in result.output and "verification passed" in result.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bnfold")] == []  # no staging left


def test_json_report_follows_the_schema(model, tmp_path):
    result = invoke("fold", model, "-o", tmp_path / "f.onnx", "--format", "json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["schema"] == "bnfold.fold-report/6"
    assert report["nodes_before"] == {"total": 15, "batchnorm": 4}
    assert report["nodes_after"] == {"total": 11, "batchnorm": 0}
    assert {f["direction"] for f in report["folds"]} == {"into-preceding"}
    assert report["verification"]["passed"] is True
    assert report["verification"]["max_abs_error"] < 1e-5
    assert report["output"] == str(tmp_path / "f.onnx")


def test_dry_run_writes_nothing(model, tmp_path):
    out = tmp_path / "f.onnx"
    result = invoke(model, "-o", out, "--dry-run")
    assert result.exit_code == 0
    assert not out.exists()
    assert "wrote" not in result.output


def test_output_equal_to_input_needs_in_place(model):
    before = digest(model)
    result = invoke(model, "-o", model)
    assert result.exit_code == 2
    assert "--in-place" in result.output
    assert digest(model) == before


def test_in_place_overwrites_the_input(model):
    result = invoke(model, "--in-place")
    assert result.exit_code == 0
    assert op_count(onnx.load(model), "BatchNormalization") == 0


def test_verification_failure_exits_1_and_writes_nothing(model, tmp_path):
    out = tmp_path / "f.onnx"
    result = invoke(model, "-o", out, "--atol", "0", "--rtol", "0")
    assert result.exit_code == 1
    assert not out.exists()
    assert "verification failed, nothing written" in result.output
    assert "FAIL" in result.output


def test_no_verify_skips_verification(model, tmp_path):
    result = invoke(model, "-o", tmp_path / "f.onnx", "--no-verify")
    assert result.exit_code == 0
    assert "verification skipped" in result.output


@pytest.mark.parametrize(
    "make_bad,problem",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"definitely not a protobuf \xff\xfe"), "not a readable ONNX model"),
        (lambda p: p.write_bytes(EXAMPLE.read_bytes()[:5000]), "not a readable ONNX model"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: os.mkfifo(p), "not a regular file (a FIFO, a device or a socket)"),
    ],
    ids=["missing", "garbage", "truncated", "empty", "fifo"],
)
def test_bad_input_is_one_line_naming_the_file(tmp_path, make_bad, problem):
    path = tmp_path / "bad.onnx"
    make_bad(path)
    result = invoke(path, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_unwritable_output_fails_before_work(model, tmp_path):
    result = invoke(model, "-o", tmp_path / "missing-dir" / "f.onnx")
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_usage_errors_exit_2(model):
    assert invoke(model).exit_code == 2  # no -o / --in-place / --dry-run
    assert invoke(model, "--input-shape", "nonsense", "--dry-run").exit_code == 2
    assert invoke(model, "--format", "xml", "--dry-run").exit_code == 2


def test_input_shape_overrides_the_symbolic_batch(model):
    result = invoke(model, "--dry-run", "--format", "json", "--input-shape", "input=3,3,16,16")
    assert result.exit_code == 0
    assert json.loads(result.output)["verification"]["inputs"] == {"input": [3, 3, 16, 16]}
    unknown = invoke(model, "--dry-run", "--input-shape", "nope=1,2")
    assert unknown.exit_code == 2 and "nope" in unknown.output


def test_external_data_round_trip(model, tmp_path):
    source = tmp_path / "ext" / "model.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(model), source, save_as_external_data=True, location="weights.bin", size_threshold=0)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    result = invoke(source, "-o", out)
    assert result.exit_code == 0, result.output
    # The data file is this write's own (folded.onnx.<8 hex>.data); nothing else is left beside the model.
    written = sorted(p.name for p in out.parent.iterdir())
    assert len(written) == 2 and written[0] == "folded.onnx" and re.fullmatch(r"folded\.onnx\.[0-9a-f]{8}\.data", written[1])
    assert_same_outputs(onnx.load(model), onnx.load(out), atol=1e-5, rtol=1e-4)
    (source.parent / "weights.bin").unlink()
    result = invoke(source, "-o", tmp_path / "again.onnx")
    assert result.exit_code == 2 and "weights.bin" in result.output and "missing" in result.output


def test_a_malformed_model_with_external_data_gets_one_line_of_error(model, tmp_path):
    source = tmp_path / "model.onnx"
    proto = onnx.load(model)
    proto.graph.node[0].input[0] = "missing"  # onnx_ir logs a warning reading it; the checker refuses it
    onnx.save(proto, source, save_as_external_data=True, location="weights.bin", size_threshold=0)
    script = Path(sys.executable).with_name("bnfold")
    completed = subprocess.run([script, source, "-o", tmp_path / "f.onnx"], capture_output=True, text=True, env=os.environ)
    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [completed.stderr.strip()], completed.stderr
    assert completed.stderr.startswith(f"bnfold: error: {source}: not a valid ONNX model") and "missing" in completed.stderr


def test_external_data_in_place_keeps_the_data_readable(model, tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(onnx.load(model), source, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    result = invoke(source, "--in-place")
    assert result.exit_code == 0, result.output
    assert_same_outputs(onnx.load(model), onnx.load(source), atol=1e-5, rtol=1e-4)


def test_console_script_runs_the_main_job(model, tmp_path):
    script = Path(sys.executable).with_name("bnfold")
    completed = subprocess.run([script, model, "-o", tmp_path / "f.onnx"], capture_output=True, text=True, env=os.environ)
    assert completed.returncode == 0, completed.stderr
    assert "folded 4 of 4" in completed.stdout


def test_fold_onnx_accepts_an_onnx_ir_model_with_external_data(model, tmp_path):
    import onnx_ir as ir

    from bnfold import fold_onnx

    source = tmp_path / "ext" / "model.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(model), source, save_as_external_data=True, location="weights.bin", size_threshold=0)
    loaded = ir.load(source)
    folded, report = fold_onnx(loaded)
    assert report.verification.passed and len(report.folds) == 4
    assert sum(node.op_type == "BatchNormalization" for node in loaded.graph) == 4  # the input is untouched
    ir.save(folded, tmp_path / "folded.onnx", external_data="folded.data")  # untouched tensors stay external
    assert_same_outputs(onnx.load(model), onnx.load(tmp_path / "folded.onnx"), atol=1e-5, rtol=1e-4)


def test_verification_progress_goes_to_stderr_only_on_a_terminal(model, tmp_path):
    import pty

    script = Path(sys.executable).with_name("bnfold")
    controller, terminal = pty.openpty()
    with os.fdopen(controller, "rb", buffering=0) as screen:
        completed = subprocess.run([script, model, "--dry-run"], stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        shown = b""
        try:
            while chunk := screen.read(4096):
                shown += chunk
        except OSError:  # the terminal side is closed: everything has been read
            pass
    assert completed.returncode == 0
    assert b"verifying: running the original model" in shown and b"comparing outputs" in shown
    piped = subprocess.run([script, model, "--dry-run"], capture_output=True, text=True)
    assert "verifying" not in piped.stderr


@pytest.mark.parametrize("spec", ["input=3,3,16,16", "input:3,3,16,16", "3,3,16,16"])
def test_input_shape_has_one_syntax_in_fold_and_check(model, spec):
    result = invoke(model, "--dry-run", "--format", "json", "--input-shape", spec)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["verification"]["inputs"] == {"input": [3, 3, 16, 16]}
    checked = invoke("check", "--format", "json", "--input-shape", spec, model)
    assert checked.exit_code == 0, checked.output


@pytest.mark.parametrize("spec", ["input=0,3,16,16", "input=-1,3", "3,x", "input="])
def test_input_shape_rejects_the_same_bad_sizes_in_fold_and_check(model, spec):
    for command in ([model, "--dry-run"], ["check", model]):
        result = CliRunner().invoke(main, [*map(str, command), "--input-shape", spec])
        assert result.exit_code == 2 and "positive sizes" in result.output, (command, result.output)


def test_more_shapes_in_order_than_inputs_is_bad_input(model):
    result = CliRunner().invoke(main, [str(model), "--dry-run", "--input-shape", "1,3,16,16", "--input-shape", "1,2"])
    assert result.exit_code == 2 and "2 input shapes given in order, but the model has 1 input(s)" in result.output


def test_a_shape_onnxruntime_rejects_gives_its_whole_message_and_the_shape_option(model):
    result = CliRunner().invoke(main, [str(model), "--dry-run", "--input-shape", "input=1,3,17,16"])
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert "index: 2 Got: 17 Expected: 16" in line  # past onnxruntime's first line
    assert line.endswith("give each input a shape the model accepts with --input-shape NAME=D1,D2,...")
    assert "--no-verify" not in line


@pytest.mark.parametrize(
    "dtype,words,remedy",
    [("float64", "NOT_IMPLEMENTED : Could not find an implementation for Conv", "onnxruntime has no kernel for it here"),
     ("bfloat16", "INVALID_GRAPH : This is an invalid model. Type Error: Type 'tensor(bfloat16)'",
      "onnxruntime does not take that element type there")],
)  # fmt: skip
def test_a_kernel_onnxruntime_lacks_points_at_no_verify(tmp_path, dtype, words, remedy):
    """onnxruntime has no float64 or bfloat16 Conv on CPU: only skipping verification helps (the bfloat16 error
    pointed at the input shapes, and named the scratch file the model was handed over in)."""
    import ml_dtypes
    from onnx import helper
    from onnx_models import batchnorm_node, batchnorm_parameters, initializer

    rng = np.random.default_rng(0)
    numpy_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    element = helper.np_dtype_to_tensor_dtype(numpy_dtype)
    statistics = batchnorm_parameters(3, "bn", rng, dtype=numpy_dtype)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), batchnorm_node("y", "z", "bn")],
        dtype,
        [helper.make_tensor_value_info("x", element, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("z", element, [1, 3, 3, 3])],
        [initializer("W", rng.normal(size=(3, 2, 3, 3)).astype(numpy_dtype)), *statistics],
    )
    path = tmp_path / f"{dtype}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert result.exit_code == 2
    assert words in result.output and "bnfold-verify" not in result.output
    assert result.output.rstrip().endswith(f"{remedy}: use --no-verify to fold without verification")
    assert CliRunner().invoke(main, [str(path), "--dry-run", "--no-verify"]).exit_code == 0


def test_an_ill_typed_model_is_called_invalid_not_a_matter_of_input_shapes(tmp_path):
    """jax2onnx's float16 Flax export keeps float32 Conv kernels: onnxruntime will not load it. The message pointed at
    --input-shape, which cannot help."""
    from onnx import helper
    from onnx_models import batchnorm_node, batchnorm_parameters, initializer

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv"), batchnorm_node("y", "z", "bn")],
        "mixed",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT16, [1, 3, 3, 3])],
        [initializer("W", rng.normal(size=(3, 2, 3, 3)).astype(np.float32)), *batchnorm_parameters(3, "bn", rng, np.float16)],
    )
    path = tmp_path / "mixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert "bound to different types" in line and "--input-shape" not in line
    assert line.endswith("onnx.checker.check_model(model, full_check=True) lists them; fix the export")


@pytest.mark.parametrize(
    "args,words",
    [
        (["{model}", "-o", "{model}"], "is the input model; pass --in-place to overwrite it (see 'bnfold fold --help')"),
        (["{model}", "--dry-run", "--input-shape", "input=0,3,16,16"], "with positive sizes (see 'bnfold fold --help')"),
        (["check", "{model}", "--input-shape", "99999999999999999999"], "has a size past 9223372036854775807"),
        (["verify", "{model}"], "Missing argument 'CANDIDATE'. (see 'bnfold verify --help')"),
        (["--bogus"], "No such option '--bogus'. (see 'bnfold fold --help')"),
    ],
)
def test_usage_errors_are_one_line(model, args, words):
    """Click prints three lines with the usage; bnfold one, as for any other error, with the help to read."""
    completed = subprocess.run(
        [Path(sys.executable).with_name("bnfold"), *(arg.format(model=model) for arg in args)], capture_output=True, text=True
    )
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.count("\n") == 1 and completed.stderr.startswith("bnfold: error: ") and words in completed.stderr


def test_the_libraries_warnings_about_a_file_stay_off_stderr(tmp_path):
    """onnx warns that its text formats are experimental: not the user's problem, and it made the error three lines."""
    text_model = tmp_path / "model.onnxtxt"
    text_model.write_bytes(b"\x94 not text")
    script = Path(sys.executable).with_name("bnfold")
    completed = subprocess.run([script, text_model, "--dry-run"], capture_output=True, text=True)
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1, completed.stderr
    loud = subprocess.run([script, text_model, "--dry-run"], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert "experimental" in loud.stderr  # -W and PYTHONWARNINGS still show them


@pytest.mark.parametrize("command", [["{bad}", "--dry-run"], ["verify", "{model}", "{bad}"]])
def test_json_format_prints_json_on_bad_input_too(model, tmp_path, command):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = invoke(*(arg.format(model=model, bad=bad) for arg in command), "--format", "json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error == {"schema": "bnfold.error/1", "error": error["error"], "exit_code": 2}
    assert error["error"].startswith(f"{bad}: not a readable ONNX model")


@pytest.mark.parametrize(
    "args",
    [
        ["{model}", "--format", "json", "-o"],
        ["check", "{model}", "--format=json", "--bogus"],
        ["--format", "json", "verify", "{model}"],
    ],
)
def test_json_format_prints_json_on_usage_errors_too(model, args):
    """A CI step parsing stdout gets the error as JSON whatever went wrong, even before click parsed --format."""
    result = invoke(*(arg.format(model=model) for arg in args))
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["schema"] == "bnfold.error/1" and error["exit_code"] == 2 and "--help" in error["error"]


def test_options_before_a_command_go_to_that_command(model):
    """`bnfold --format json verify A B` read "verify" as the model of a fold: "Got unexpected extra argument"."""
    result = invoke("--format", "json", "verify", model, model)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema"] == "bnfold.verify-report/3"


def test_options_before_the_model_go_to_fold(model, tmp_path):
    out = tmp_path / "f.onnx"
    result = invoke("--no-verify", "--format", "json", model, "-o", out)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["nodes_after"]["batchnorm"] == 0 and out.exists()


def test_check_reports_an_internal_error_for_its_model_and_checks_the_others(model, tmp_path, monkeypatch):
    from bnfold.checks import sources

    other = tmp_path / "other.onnx"
    shutil.copy(model, other)
    real = sources.check_onnx
    monkeypatch.setattr(sources, "check_onnx", lambda path, **options: 1 / 0 if path == model else real(path, **options))
    result = invoke("check", model, other, "--format", "json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["unreadable"] == [{"path": str(model), "message": "internal error (ZeroDivisionError: division by zero); please report it"}]
    assert report["summary"]["checked"] == 1 and any(finding["code"] == "BN006" for finding in report["findings"])


@pytest.mark.parametrize("command", [["--dry-run"], ["--dry-run", "--format", "json"], ["--dry-run", "--atol", "0", "--rtol", "0"]])
def test_a_reader_that_closes_the_pipe_leaves_the_exit_code_the_verdicts(model, command):
    """`bnfold ... | head -1` closes the pipe before the report is written: that was an internal error (exit 2,
    "please report it"). The output ends there; the exit code is the verdict's (1 when the verification fails)."""
    script = Path(sys.executable).with_name("bnfold")
    read, write = os.pipe()
    os.close(read)  # (the reader is gone before bnfold writes anything)
    try:
        completed = subprocess.run([script, model, *command], stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert completed.returncode == (1 if "--atol" in command else 0)
    assert "internal error" not in completed.stderr and "Traceback" not in completed.stderr
