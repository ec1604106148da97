"""Hostile and unlucky inputs: outputs with nothing to compare, inputs too large to make, names that
would forge report lines. Real models (hand-built ONNX run in onnxruntime, real nn.Modules), exact
messages, figures and exit codes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from onnx import helper
from onnx_models import batchnorm_node, batchnorm_parameters, initializer, make_model, run
from torch import nn

import bnfold
from bnfold.checks import check_model, check_onnx
from bnfold.cli import main
from bnfold.onnx_fold.verify import VerificationUnavailableError, random_inputs, verify
from bnfold.verification import RANDOM_INPUT_BUDGET_BYTES, VerificationError

CONV_OUTPUT_ELEMENTS = 4 * 6 * 6  # a 3x3 Conv with 4 channels on an 8x8 image, one sample


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def conv_batchnorm(
    tail: list[onnx.NodeProto], outputs: list[str], input_shape=("N", 3, 8, 8), bn_name="bn", conv_name="conv", extra=()
) -> onnx.ModelProto:
    """x -> Conv -> BatchNorm -> b, then ``tail`` nodes reading b; the BatchNorm folds into the Conv.
    ``extra`` initializers are for the tail."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name=conv_name), batchnorm_node("c", "b", bn_name), *tail]
    weight = initializer("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32))
    initializers = [weight, *batchnorm_parameters(4, bn_name, rng), *extra]
    return make_model(nodes, [("x", list(input_shape))], outputs, initializers)


def nan_everywhere(source: str, output: str) -> list[onnx.NodeProto]:
    """sqrt(-exp(source)): NaN in every element."""
    return [
        helper.make_node("Exp", [source], [f"{output}_exp"]),
        helper.make_node("Neg", [f"{output}_exp"], [f"{output}_neg"]),
        helper.make_node("Sqrt", [f"{output}_neg"], [output]),
    ]


def two_way(original: list[onnx.NodeProto], folded: list[onnx.NodeProto], initializers=()) -> tuple[bytes, onnx.ModelProto]:
    """An "original" and a "folded" model of x -> y, to verify one against the other."""
    def model(nodes):
        return make_model(nodes, [("x", [1, 4, 6, 6])], ["y"], list(initializers))

    return model(original).SerializeToString(), model(folded)


ZERO = initializer("zero", np.zeros((), np.float32))


def feeds_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The inputs verification runs on (seed 0)."""
    return random_inputs(ir.from_proto(model), seed=0)


# --- A. nothing compared is not a pass ---------------------------------------------------------


def test_an_output_nan_everywhere_in_the_original_fails_the_fold_with_nothing_written(tmp_path):
    path, out = tmp_path / "nan.onnx", tmp_path / "folded.onnx"
    onnx.save(conv_batchnorm(nan_everywhere("b", "y"), ["y"]), path)
    result = invoke(path, "-o", out, "--format", "json")
    assert result.exit_code == 1 and not out.exists()
    reason = (
        f"nothing was compared: output 'y': the original is NaN or Inf in all {CONV_OUTPUT_ELEMENTS} element(s); verify on "
        "inputs for which an output holds finite values (a detector's: inputs it detects something in), or --no-verify"
    )
    assert result.stderr == f"bnfold: error: {path}: verification failed, nothing written: {reason}\n"
    verification = json.loads(result.stdout)["verification"]
    assert verification["passed"] is False and verification["reason"] == reason
    assert verification["outputs_compared"] == 0
    assert verification["max_abs_error"] is None and verification["max_rel_error"] is None
    assert verification["outputs"] == [
        {"name": "y", "dtype": "float32", "status": "not compared", "elements": CONV_OUTPUT_ELEMENTS,
         "elements_compared": 0, "max_abs_error": None, "max_rel_error": None, "atol": 1e-6, "rtol": 1e-3,
         "reason": f"the original is NaN or Inf in all {CONV_OUTPUT_ELEMENTS} element(s)", "magnitude": None,
         "noise": None, "noise_elements": None, "noise_from": "",
             "passed": False}
    ]  # fmt: skip
    text = invoke(path, "--dry-run").stdout.splitlines()
    assert text[-2:] == [
        f"  verification FAILED: 1 output(s), {reason}",
        f"    --   y: not compared: the original is NaN or Inf in all {CONV_OUTPUT_ELEMENTS} element(s)",
    ]


def test_nan_in_the_same_places_on_both_sides_is_left_out_and_counted():
    tail = [helper.make_node("Sqrt", ["b"], ["half"]), *nan_everywhere("b", "nan")]
    model = conv_batchnorm(tail, ["half", "nan"])
    (original_half, _) = run(model, feeds_of(model))
    finite = int(np.isfinite(original_half).sum())
    assert 0 < finite < CONV_OUTPUT_ELEMENTS  # a real mixture, found by onnxruntime on the original

    _, report = bnfold.fold_onnx(model)
    half, nan = report.verification.outputs
    assert report.verification.passed and len(report.folds) == 1
    assert (half.status, half.elements, half.elements_compared) == ("passed", CONV_OUTPUT_ELEMENTS, finite)
    assert (nan.status, nan.elements, nan.elements_compared, nan.max_abs_error) == ("not compared", CONV_OUTPUT_ELEMENTS, 0, None)
    assert report.verification.max_abs_error == half.max_abs_error < 1e-5
    lines = report.format_text().splitlines()
    assert lines[-3].startswith("  verification passed: 2 output(s), 1 not compared, max abs error ")
    assert lines[-2].startswith("    ok   half: max abs ")
    assert lines[-2].endswith(f"over {finite} element(s), {CONV_OUTPUT_ELEMENTS - finite} where the original is NaN or Inf left out")
    assert lines[-1] == f"    --   nan: not compared: the original is NaN or Inf in all {CONV_OUTPUT_ELEMENTS} element(s)"
    assert report.to_dict()["verification"]["outputs_compared"] == 1


def test_nan_brought_in_by_the_folded_model_fails():
    # y = x + sqrt(min(x, 0)): x itself where x >= 0, NaN where x < 0
    original, folded = two_way(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_node("Min", ["x", "zero"], ["m"]), helper.make_node("Sqrt", ["m"], ["s"]),
         helper.make_node("Add", ["x", "s"], ["y"])],
        [ZERO],
    )  # fmt: skip
    negative = int((feeds_of(folded)["x"] < 0).sum())
    verification = verify(original, folded)
    (y,) = verification.outputs
    assert not verification.passed and 0 < negative < y.elements == 144
    assert (y.status, y.elements_compared, y.max_abs_error) == ("failed", 144, float("inf"))
    assert y.reason == f"NaN or Inf in {negative} element(s) where the original is finite"
    assert verification.reason == (
        f"folded model differs from the original: output 'y': {y.reason}"
    )


def test_inf_brought_in_by_the_folded_model_fails():
    original, folded = two_way([helper.make_node("Identity", ["x"], ["y"])], [helper.make_node("Div", ["x", "zero"], ["y"])], [ZERO])
    (y,) = verify(original, folded).outputs
    assert (y.status, y.reason) == ("failed", "NaN or Inf in 144 element(s) where the original is finite")


def test_a_finite_value_where_the_original_is_nan_fails():
    original, folded = two_way([helper.make_node("Sqrt", ["x"], ["y"])], [helper.make_node("Relu", ["x"], ["y"])])
    negative = int((feeds_of(folded)["x"] < 0).sum())
    (y,) = verify(original, folded).outputs
    assert (y.status, y.reason) == ("failed", f"{negative} element(s) differ where the original is NaN or Inf")


def test_infinities_must_keep_their_sign():
    original, folded = two_way(
        [helper.make_node("Div", ["x", "zero"], ["y"])],
        [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Div", ["n", "zero"], ["y"])],
        [ZERO],
    )
    (y,) = verify(original, folded).outputs
    assert (y.status, y.reason) == ("failed", "144 element(s) differ where the original is NaN or Inf")
    same = verify(original, onnx.load_from_string(original))
    assert not same.passed and same.reason.startswith("nothing was compared: output 'y': the original is NaN or Inf in all 144 element(s); ")
    assert same.reason.endswith("or verify=False")


class ConvBatchNorm(nn.Module):
    """Conv -> BatchNorm, whose forward returns ``shape_output(y)``."""

    def __init__(self, shape_output):
        super().__init__()
        self.conv, self.bn, self.shape_output = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), shape_output
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.shape_output(self.bn(self.conv(x)))


def fold_torch(shape_output):
    torch.manual_seed(0)
    return bnfold.fold(ConvBatchNorm(shape_output).eval(), (torch.randn(1, 3, 8, 8),))


@pytest.mark.parametrize(
    ("shape_output", "returned"),
    [
        (lambda y: None, "output is None"),
        (lambda y: y.detach().numpy(), "output is ndarray"),
        (lambda y: {"a": None, "b": 2}, "output['a'] is None, output['b'] is int"),
        (lambda y: (), "an empty container"),
    ],
    ids=["None", "numpy", "dict-of-non-tensors", "empty-tuple"],
)
def test_a_forward_that_returns_no_tensor_fails_verification(shape_output, returned):
    with pytest.raises(VerificationError) as raised:
        fold_torch(shape_output)
    assert str(raised.value) == f"nothing was compared: the forward returned no tensors ({returned})"
    verification = raised.value.verification
    assert not verification.passed and verification.compared == []
    assert all(output.status == "not compared" for output in verification.outputs)
    assert raised.value.report.folds  # the fold happened; only its proof is missing


def test_non_tensor_leaves_beside_tensors_are_reported_not_compared():
    result = fold_torch(lambda y: (y, None, y.detach().numpy(), 3.0, {"n": torch.tensor(float("nan"))}))
    verification = result.report.verification
    assert verification.passed
    statuses = [(o.name, o.status, o.elements_compared, o.reason) for o in verification.outputs]
    assert statuses == [
        ("output[0]", "passed", CONV_OUTPUT_ELEMENTS, ""),
        ("output[1]", "not compared", 0, "the forward returned None here, not a tensor"),
        ("output[2]", "not compared", 0, "the forward returned ndarray here, not a tensor"),
        ("output[3]", "not compared", 0, "the forward returned float here, not a tensor"),
        ("output[4]['n']", "not compared", 0, "the original is NaN or Inf in all 1 element(s)"),
    ]
    assert result.report.format_text().splitlines()[-6].startswith("  verification passed: 5 output(s), 4 not compared, ")


def test_empty_outputs_fail_saying_which_inputs_would_verify():
    """A detector whose random-weight scores pass no threshold returns empty boxes (torchvision's
    fasterrcnn_mobilenet_v3_large_320_fpn): the message said nothing of what to do."""
    with pytest.raises(VerificationError) as raised:
        fold_torch(lambda y: y.flatten()[y.flatten() > 1e9])
    assert str(raised.value) == (
        "nothing was compared: output 'output': the output is empty; verify on inputs for which an output holds finite "
        "values (a detector's: inputs it detects something in), or verify=False"
    )


def test_a_tensor_nan_everywhere_fails_verification():
    with pytest.raises(VerificationError, match=r"^nothing was compared: output 'output': the original is NaN or Inf in all 144 element"):
        fold_torch(lambda y: y * float("nan"))


def test_batch_dependence_of_outputs_nan_everywhere_is_not_measured():
    findings = check_onnx(conv_batchnorm(nan_everywhere("b", "y"), ["y"]))
    assert [(f.code, f.message) for f in findings if f.code.startswith("BD")] == [
        ("BD002", "batch dependence not measured: no output row has a finite value to compare "
                  f"(output 'y': the original is NaN or Inf in all {CONV_OUTPUT_ELEMENTS} element(s))"),
    ]  # fmt: skip


# --- B. random inputs within a stated memory budget --------------------------------------------

HUGE = [1, 3, 100000, 100000]


def test_the_budget_is_two_gib():
    assert RANDOM_INPUT_BUDGET_BYTES == 2 * 2**30


def test_a_huge_declared_input_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.onnx"
    onnx.save(conv_batchnorm([], ["b"], input_shape=HUGE), path)
    result = invoke(path, "--dry-run")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        f"bnfold: error: {path}: input 'x' of shape [1, 3, 100000, 100000] float32 takes 112 GiB, over the 2 GiB budget "
        "for random inputs, and the model fixes sizes that take 112 GiB at the least, so no --input-shape brings it "
        "within; use --no-verify to fold without verification\n"
    )
    assert invoke(path, "--dry-run", "--no-verify").exit_code == 0  # the remedy the message names


def test_a_huge_given_shape_names_input_shape_as_the_remedy(tmp_path):
    path = tmp_path / "free.onnx"
    onnx.save(conv_batchnorm([], ["b"], input_shape=["N", 3, "H", "W"]), path)
    result = invoke(path, "--dry-run", "--input-shape", "x=1,3,100000,100000")
    assert result.exit_code == 2
    assert result.stderr == (
        f"bnfold: error: {path}: input 'x' of shape [1, 3, 100000, 100000] float32 takes 112 GiB, over the 2 GiB budget "
        "for random inputs; give a smaller shape with --input-shape x=D1,D2,...\n"
    )
    assert invoke(path, "--dry-run", "--input-shape", "x=1,3,16,16").exit_code == 0


def test_the_budget_counts_every_input():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), batchnorm_node("c", "y", "bn"),
             helper.make_node("Identity", ["z"], ["z_out"])]  # fmt: skip
    weight = initializer("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32))
    model = make_model(nodes, [("x", ["N", 3, "H", "W"]), ("z", ["N", 2, "H", "W"])], ["y", "z_out"],
                       [weight, *batchnorm_parameters(4, "bn", rng)])  # fmt: skip
    shapes = {"x": [1, 3, 16384, 8192], "z": [1, 2, 16384, 8192]}  # 1.5 GiB and 1 GiB of float32
    with pytest.raises(VerificationUnavailableError) as raised:
        bnfold.fold_onnx(model, input_shapes=shapes)
    assert str(raised.value) == (
        "input 'x' of shape [1, 3, 16384, 8192] float32 takes 1.5 GiB (2.5 GiB with the other inputs), over the 2 GiB "
        "budget for random inputs; give a smaller shape with --input-shape x=D1,D2,..."
    )


def test_check_reports_a_huge_input_as_not_measured(tmp_path):
    path = tmp_path / "huge.onnx"
    onnx.save(conv_batchnorm([], ["b"], input_shape=["N", *HUGE[1:]]), path)
    result = CliRunner().invoke(main, ["check", str(path), "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0
    findings = json.loads(result.stdout)["findings"]
    assert [(f["code"], f["message"]) for f in findings if f["code"] == "BD002"] == [
        ("BD002", "batch dependence not measured: input 'x' of shape [4, 3, 100000, 100000] float32 takes 447 GiB, over "
                  "the 2 GiB budget for random inputs, and the model fixes sizes that take 112 GiB at the least, so no "
                  "--input-shape brings it within"),
    ]  # fmt: skip


def test_check_of_a_pytorch_model_with_huge_example_inputs_is_not_measured():
    model = ConvBatchNorm(lambda y: y).eval()
    shapes_only = torch.empty(HUGE, device="meta")  # only the shape and dtype are read: nothing allocated
    findings = [(f.code, f.message) for f in check_model(model, shapes_only) if f.code.startswith("BD")]
    assert findings == [
        ("BD002", "batch dependence not measured: input 'input0' of shape [4, 3, 100000, 100000] float32 takes 447 GiB, "
                  "over the 2 GiB budget for random inputs; give smaller example inputs (--input-shape D1,D2,... in order)"),
    ]  # fmt: skip


@pytest.mark.parametrize("dims", [[1, 3, -4, 8], [1, 0, 8, 8]])
def test_input_shapes_below_one_are_a_clear_error(tmp_path, dims):
    model = conv_batchnorm([], ["b"])
    with pytest.raises(VerificationUnavailableError) as raised:
        bnfold.fold_onnx(model, input_shapes={"x": dims})
    assert str(raised.value) == f"--input-shape x={','.join(map(str, dims))}: every size must be at least 1"
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    result = invoke(path, "--dry-run", "--input-shape", f"x={','.join(map(str, dims))}")
    assert result.exit_code == 2 and "positive sizes" in result.stderr and "Traceback" not in result.output


def test_a_declared_size_below_one_is_a_clear_error():
    model = conv_batchnorm([], ["b"], input_shape=[1, 3, 8, 8])
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -5
    with pytest.raises(VerificationUnavailableError) as raised:
        bnfold.fold_onnx(model)
    assert str(raised.value) == (
        "input 'x' declares shape [1, 3, -5, 8], with a size below 1; give one with --input-shape x=D1,D2,..."
    )
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    bd = [f.message for f in check_onnx(model) if f.code == "BD002"]
    assert bd == ["batch dependence not measured: input 'x' declares a size below 1 ([N,3,-5,8]); give one with --input-shape"]


# --- C. names from model files cannot forge report lines -----------------------------------------

FORGED = "bn\nall good: no findings in 1 checked model(s)"
LAYER = "conv\x1b[2J\t100%, ok:"  # a terminal escape, a tab, GitHub's escape character and separators
OUTPUT = "y\r\x1b[1A"
LEFT = "left\x1b]0;title\x07"  # a BatchNorm with nothing to fold into (terminal title sequence)
ESCAPED = {FORGED: "bn\\nall good: no findings in 1 checked model(s)", LAYER: "conv\\x1b[2J\\t100%, ok:",
           OUTPUT: "y\\r\\x1b[1A", LEFT: "left\\x1b]0;title\\x07"}  # fmt: skip
BN006_HINT = bnfold.checks.CODES["BN006"].hint


def hostile_model() -> onnx.ModelProto:
    """A Conv -> BatchNorm pair that folds, output OUTPUT, and a BatchNorm LEFT on the input that cannot."""
    left_rng = np.random.default_rng(1)
    tail = [helper.make_node("Identity", ["b"], [OUTPUT]), batchnorm_node("x", "left_out", LEFT),
            helper.make_node("Relu", ["left_out"], ["z"])]  # fmt: skip
    return conv_batchnorm(tail, [OUTPUT, "z"], bn_name=FORGED, conv_name=LAYER, extra=batchnorm_parameters(3, LEFT, left_rng))


def all_printable(text: str) -> bool:
    return all(line.isprintable() for line in text.split("\n"))


@pytest.fixture
def hostile_file(tmp_path):
    path = tmp_path / "evil\nall good.onnx"  # a model file's name comes from the pull request too
    onnx.save(hostile_model(), path)
    return path


def test_check_text_output_escapes_names_and_paths(hostile_file):
    result = CliRunner().invoke(main, ["check", str(hostile_file), "--select", "BN006"], catch_exceptions=False)
    path = str(hostile_file).replace("\n", "\\n")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        f"{path}: BN006 info {ESCAPED[FORGED]}: `bnfold` would fold it into the preceding {ESCAPED[LAYER]} [Conv] "
        "and remove it",
        f"BN006 (1): {BN006_HINT}",
        "1 info in 1 checked model(s)",
    ]
    assert all_printable(result.stdout)


def test_github_annotations_escape_names_then_apply_githubs_escapes(hostile_file):
    result = CliRunner().invoke(main, ["check", str(hostile_file), "--select", "BN006", "--format", "github"])
    path = str(hostile_file).replace("\n", "\\n").replace("%", "%25").replace(":", "%3A").replace(",", "%2C")
    message = (
        f"{ESCAPED[FORGED]}: `bnfold` would fold it into the preceding {ESCAPED[LAYER]} [Conv] and remove it ({BN006_HINT})"
    )
    assert result.exit_code == 0
    assert result.stdout == f"::notice file={path},title=BN006::{message.replace('%', '%25')}\n"


def test_check_json_carries_names_exactly(hostile_file):
    result = CliRunner().invoke(main, ["check", str(hostile_file), "--select", "BN006", "--format", "json"])
    (finding,) = json.loads(result.stdout)["findings"]
    assert (finding["path"], finding["name"]) == (str(hostile_file), FORGED)
    assert LAYER in finding["message"]
    assert all_printable(result.stdout)  # JSON escapes control characters itself


def test_fold_report_text_escapes_names_from_the_model(hostile_file):
    _, report = bnfold.fold_onnx(hostile_model())
    lines = report.format_text().splitlines()
    assert f"  folded  {ESCAPED[FORGED]} [BatchNormalization] into preceding {ESCAPED[LAYER]} [Conv]" in lines
    assert any(line.startswith(f"  left    {ESCAPED[LEFT]}: [no-foldable-neighbour] ") for line in lines)
    assert any(line.startswith(f"    ok   {ESCAPED[OUTPUT]}: max abs ") for line in lines)
    assert len(lines) == 7 and all_printable(report.format_text())
    assert report.to_dict()["folds"][0]["batchnorm"] == FORGED  # JSON keeps the exact name
    result = invoke(hostile_file, "--dry-run")
    assert result.exit_code == 0 and all_printable(result.stdout) and "\nall good" not in result.stdout


def test_assertion_message_escapes_module_names():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3))
    model.add_module(FORGED, nn.BatchNorm2d(4))
    with pytest.raises(AssertionError) as raised:
        bnfold.assert_inference_ready(model.train(), (torch.randn(2, 3, 8, 8),))
    message = str(raised.value)
    assert f"  BN001 {ESCAPED[FORGED]}: " in message
    assert not any(line.startswith("all good") for line in message.splitlines())
