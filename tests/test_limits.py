"""The command line's --max-memory and --timeout: a model that asks for more than the limits is stopped at once,
on one line, exit 2, nothing written, and the limits are lifted after the command."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from test_file_safety import BNFOLD, EXAMPLE, endless_loop_model, ours

from bnfold.cli import main
from bnfold.limits import parse_size


def memory_bomb(path: Path) -> Path:
    """Conv -> BN (so verification runs) plus ReduceSum(ConstantOfShape([30000, 30000])): 374 bytes asking
    onnxruntime for 3.6 GB."""
    initializers = [
        nh.from_array(np.array([30000, 30000], np.int64), "shape"),
        nh.from_array(np.ones((2, 1, 1, 1), np.float32), "w"),
        nh.from_array(np.array([1.0, 2.0], np.float32), "s"),
        nh.from_array(np.array([0.0, 1.0], np.float32), "b"),
        nh.from_array(np.array([0.5, 0.0], np.float32), "m"),
        nh.from_array(np.array([2.0, 1.0], np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=nh.from_array(np.array([1.0], np.float32))),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["bn", "total"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], initializers,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    ("command", "environment"),
    [(["{model}", "-o", "{out}", "--max-memory", "1G"], {}), (["verify", "{model}", "{model}"], {"BNFOLD_MAX_MEMORY": "1G"})],
    ids=["fold", "verify-env"],
)
def test_a_model_asking_more_memory_than_the_limit_is_refused_at_once(tmp_path, monkeypatch, command, environment):
    model, out = memory_bomb(tmp_path / "bomb.onnx"), tmp_path / "out.onnx"
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    before = resource.getrlimit(resource.RLIMIT_DATA)
    result = CliRunner().invoke(main, [part.format(model=model, out=out) for part in command])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith(f"bnfold: error: {model}: onnxruntime cannot run the original model")
    assert "Failed to allocate memory" in line and "raise --max-memory" in line and line.endswith("(the memory limit: 1.0 GiB)")
    assert not out.exists()
    assert resource.getrlimit(resource.RLIMIT_DATA) == before  # (lifted after the command)


def test_check_reports_the_run_the_memory_limit_stopped(tmp_path):
    model = memory_bomb(tmp_path / "bomb.onnx")
    result = CliRunner().invoke(main, ["check", str(model), "--max-memory", "1G", "--select", "BD002"])
    assert result.exit_code == 0, result.output
    assert "BD002" in result.output and "Failed to allocate memory" in result.output
    assert "(the memory limit: 1.0 GiB)" in result.output


@pytest.mark.parametrize("command", [["{model}", "-o", "{out}"], ["check", "{model}"]], ids=["fold", "check"])
def test_timeout_stops_a_run_that_never_ends(tmp_path, command):
    """An endless onnxruntime Loop, stopped by --timeout as by Ctrl-C: one line naming the file, exit 2, no output,
    no scratch files."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    model, out = endless_loop_model(tmp_path / "loop.onnx"), tmp_path / "out.onnx"
    start = time.monotonic()
    process = subprocess.run(
        [BNFOLD, *(part.format(model=model, out=out) for part in command), "--timeout", "3"],
        capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)}, timeout=120,
    )  # fmt: skip
    assert process.returncode == 2, process.stderr
    assert process.stderr.strip() == f"bnfold: error: {model}: stopped at the time limit of 3 s (--timeout)"
    assert time.monotonic() - start < 60
    assert not out.exists() and ours(scratch) == []


@pytest.mark.parametrize(
    ("text", "size"), [("4G", 4 << 30), ("1.5GiB", 3 << 29), ("512M", 512 << 20), ("512mb", 512 << 20), ("none", None)]
)
def test_sizes_read_in_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("option", "problem"),
    [("--max-memory=2x", "is not a size"), ("--max-memory=64M", "less than 256M"), ("--max-memory=-1G", "is not a size"),
     ("--timeout=nan", "nan is not a number"), ("--timeout=inf", "not in the range"), ("--timeout=0", "not in the range")],
)  # fmt: skip
def test_a_limit_that_cannot_be_used_is_a_usage_error(option, problem):
    """64M let OpenBLAS abort the process; nan, inf and 1e300 seconds were internal errors."""
    result = CliRunner().invoke(main, [str(EXAMPLE), "--dry-run", option])
    assert result.exit_code == 2 and problem in result.output and option.partition("=")[0] in result.output
    assert result.output.count("\n") == 1


def test_more_memory_than_any_machine_has_is_no_limit():
    result = CliRunner().invoke(main, [str(EXAMPLE), "--dry-run", "--max-memory", "99999999999999999999T"])
    assert result.exit_code == 0, result.output


def test_a_timeout_in_process_ends_the_command_not_the_interpreter():
    """The command line run in-process (CliRunner, a notebook): a --timeout outside an onnxruntime run ended the host
    interpreter (os._exit); only a stopped onnxruntime run needs that."""
    result = CliRunner().invoke(main, [str(EXAMPLE), "--dry-run", "--no-verify", "--timeout", "0.001"])
    assert result.exit_code == 2 and f"{EXAMPLE}: stopped at the time limit of 0.001 s (--timeout)" in result.output


def test_a_timeout_before_the_paths_are_read_names_no_file():
    """The time ran out as the command line was read (a limit under a millisecond): the line named the file
    ``bnfold`` ("bnfold: error: bnfold: stopped at ...")."""
    from bnfold.cli import fold
    from bnfold.limits import TimeLimitReached, _Reached

    with pytest.raises(TimeLimitReached) as stopped:
        _Reached(0.0001, click.Context(fold))(signal.SIGALRM, None)
    assert str(stopped.value) == "stopped at the time limit of 0.0001 s (--timeout)"


def test_the_timeout_stops_with_the_work_not_the_report(tmp_path, monkeypatch):
    """The output written, a reader slow on the pipe kept the report waiting past --timeout: exit 2, "stopped",
    with the output in place."""
    import bnfold.cli

    emit = bnfold.cli._emit

    def slow_emit(report, output_format):
        time.sleep(2)
        emit(report, output_format)

    monkeypatch.setattr(bnfold.cli, "_emit", slow_emit)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(EXAMPLE), "-o", str(out), "--no-verify", "--timeout", "1"])
    assert result.exit_code == 0, result.output
    assert out.exists() and "folded 4 of 4" in result.output
