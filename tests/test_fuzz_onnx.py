"""Seeded byte mutations of small serialized models (Conv, Gemm, ConvTranspose and MatMul, each followed by
a BatchNorm): bnfold may refuse any of them, but only with its own errors, never a traceback.

Each mutation flips bits, overwrites, truncates or inserts random bytes. Every mutated file goes through
``bnfold.fold_onnx`` (verified for one in four) and ``bnfold.check``; the protobuf (when it still parses)
through ``fold_onnx`` too, which exercises the fast path and the pass without the load-time checks. A
smaller number goes through the command line.
"""

from __future__ import annotations

import logging
import traceback

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper
from onnx_models import batchnorm_node, batchnorm_parameters, initializer, make_model

import bnfold
from bnfold.cli import main
from bnfold.onnx_fold.io import InputError
from bnfold.onnx_fold.verify import VerificationUnavailableError
from bnfold.verification import VerificationError

OWN_ERRORS = (InputError, VerificationError, VerificationUnavailableError)
# numpy's floating-point warnings count as failures too: on the command line each would be two more lines on
# stderr (a signalling NaN in a mutated weight raised one when cast to float64).
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
MUTATIONS_PER_MODEL = 250
CLI_RUNS_PER_MODEL = 10


def _models() -> dict[str, onnx.ModelProto]:
    r = np.random.default_rng(0)

    def weight(*shape):
        return initializer("W", r.normal(size=shape).astype(np.float32))

    def bias(size):
        return initializer("B", r.normal(size=size).astype(np.float32))

    def pair(layer, shape, channels, inits):
        nodes = [layer, batchnorm_node("y", "z", "bn")]
        return make_model(nodes, [("x", shape)], ["z"], [*inits, *batchnorm_parameters(channels, "bn", r)])

    return {
        "conv": pair(helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv"), [1, 2, 4, 4], 3, [weight(3, 2, 3, 3), bias(3)]),
        "gemm": pair(helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm", transB=1), [2, 4], 3, [weight(3, 4), bias(3)]),
        "conv_transpose": pair(
            helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="convt", group=2), [1, 2, 3, 3], 4, [weight(2, 2, 2, 2)]
        ),
        "matmul": pair(helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul"), [2, 4], 3, [weight(4, 3)]),
    }


MODELS = _models()


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:  # flip bits
        for _ in range(rng.integers(1, 5)):
            data[rng.integers(len(data))] ^= 1 << rng.integers(8)
    elif kind == 1:  # overwrite
        at, size = rng.integers(len(data)), rng.integers(1, 9)
        data[at : at + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    elif kind == 2:  # truncate
        data = data[: rng.integers(len(data))]
    else:  # insert
        at, size = rng.integers(len(data) + 1), rng.integers(1, 9)
        data[at:at] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return bytes(data)


def mutants(name: str, count: int, stream: int):
    """``count`` mutations of model ``name``, the same on every run."""
    data = MODELS[name].SerializeToString()
    for index in range(count):
        yield index, mutate(data, np.random.default_rng([stream, sorted(MODELS).index(name), index]))


@pytest.fixture(autouse=True)
def _quiet_onnx_ir(caplog):
    caplog.set_level(logging.ERROR)  # onnx_ir warns about every dangling name a mutation creates


def _unexpected(calls) -> list[str]:
    failures = []
    for what, call in calls:
        try:
            call()
        except OWN_ERRORS:
            pass
        except Exception:
            failures.append(f"{what}: {traceback.format_exc(limit=-3)}")
    return failures


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mutated_models_raise_only_bnfold_errors(name, tmp_path):
    failures = []
    for index, data in mutants(name, MUTATIONS_PER_MODEL, stream=1):
        path = tmp_path / f"{name}_{index}.onnx"
        path.write_bytes(data)
        calls = [
            ("fold_onnx(path)", lambda path=path, index=index: bnfold.fold_onnx(path, verify=index % 4 == 0)),
            ("check", lambda path=path: bnfold.check(path)),
        ]
        try:
            proto = onnx.ModelProto.FromString(data)
        except Exception:
            proto = None  # not a protobuf any more: only the file-reading paths apply
        if proto is not None:
            calls.append(("fold_onnx(ModelProto)", lambda proto=proto: bnfold.fold_onnx(proto, verify=False)))
        failures += [f"mutation {index}: {failure}" for failure in _unexpected(calls)]
    assert not failures, f"{len(failures)} unexpected exception(s), first:\n{failures[0]}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mutated_models_on_the_command_line_exit_cleanly(name, tmp_path):
    runner = CliRunner()
    for index, data in mutants(name, CLI_RUNS_PER_MODEL, stream=2):
        path = tmp_path / f"{name}_{index}.onnx"
        path.write_bytes(data)
        for args in (["fold", str(path), "-o", str(tmp_path / "out.onnx")], ["check", str(path)]):
            result = runner.invoke(main, args)
            crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
            assert result.exit_code in (0, 1, 2) and not crashed, (index, args, result.output, result.exc_info)
            assert "Traceback" not in result.output, (index, args, result.output)
            assert len(result.stderr.splitlines()) <= 1, (index, args, result.stderr)  # one line of error at most
