"""`bnfold check`: every finding on real (trained, exported, loaded) models, the loading routes, the
output formats, code selection and exit codes, and the Python API."""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnfold
import bnfold.check_command
import bnfold.checks
from bnfold.checks import CODES, assert_inference_ready, check_model, check_onnx, errors
from bnfold.checks.output import CheckResults, format_github
from bnfold.cli import main
from bnfold.testing import FIXTURES, SmallCNN, example_input, export_onnx, trained_fixture

SMALL_CNN_BATCHNORMS = ["stem.1", "block.bn1", "block.bn2", "down.1"]
GITHUB_COMMAND = re.compile(r"^::(error|warning|notice) file=[^,]+,title=[A-Za-z0-9]+::.+")


def codes(findings) -> list[str]:
    return [finding.code for finding in findings]


def named(findings, code: str) -> list[str]:
    return [finding.name for finding in findings if finding.code == code]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models are tiny: one thread is faster than two fighting over a busy runner's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _trained_once(name: str) -> nn.Module:
    return trained_fixture(name)


def trained(name: str) -> nn.Module:
    """A fresh copy of the trained fixture ``name`` in eval mode (each is trained once per session)."""
    return copy.deepcopy(_trained_once(name))


def invoke(*args):
    return CliRunner().invoke(main, ["check", *map(str, args)], catch_exceptions=False)


@pytest.fixture
def trained_cnn() -> nn.Module:
    return trained("small_cnn")


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict[str, str]:
    """The trained small_cnn exported in eval and in training mode, batch dimension symbolic."""
    directory = tmp_path_factory.mktemp("onnx")
    files = {}
    for mode, training in (("eval", False), ("train", True)):
        files[mode] = str(directory / f"small_cnn_{mode}.onnx")
        export_onnx(trained("small_cnn").train(training), example_input("small_cnn"), files[mode], training=training)
    return files


def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 2))


# The registry and its documentation


def test_every_code_is_in_the_documented_table_with_its_severity():
    rows = [line.split() for line in bnfold.checks.__doc__.splitlines() if re.match(r"^[A-Z]{2}\d{3}\s", line)]
    table = {row[0]: row[1] for row in rows}
    assert table == {code: entry.severity for code, entry in CODES.items()}


# Clean models: no false alarms


@pytest.mark.parametrize("name", FIXTURES)
def test_trained_fixture_in_eval_mode_has_no_finding(name):
    findings = check_model(trained(name), example_input(name))
    assert findings == []  # also no BD002: batch dependence was measured, and none was found


@pytest.mark.parametrize("name", FIXTURES)
def test_trained_fixture_exported_in_eval_mode_only_has_its_foldable_batchnorms(name, tmp_path):
    path = tmp_path / f"{name}.onnx"
    export_onnx(trained(name), example_input(name), path)
    findings = check_onnx(path)
    assert codes(findings) == ["BN006"] * FIXTURES[name].batchnorms
    assert all(finding.severity == "info" for finding in findings)


def test_eval_export_at_opset_12_is_not_mistaken_for_training(trained_cnn, tmp_path):
    path = tmp_path / "opset12.onnx"
    export_onnx(trained_cnn, example_input("small_cnn"), path, opset=12)
    assert errors(check_onnx(path)) == []


# Training mode


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_in_train_mode_reports_every_batchnorm_and_batch_dependence(name):
    findings = check_model(trained(name).train(), example_input(name))
    assert codes(findings).count("BN001") == FIXTURES[name].batchnorms
    assert "BD001" in codes(findings)


def test_train_mode_check_leaves_the_model_as_it_was(trained_cnn):
    trained_cnn.train()
    before = {name: tensor.clone() for name, tensor in trained_cnn.state_dict().items()}
    findings = check_model(trained_cnn, example_input("small_cnn"))
    assert named(findings, "BN001") == SMALL_CNN_BATCHNORMS
    assert trained_cnn.training
    after = trained_cnn.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_train_mode_onnx_export_reports_training_mode_and_measured_batch_dependence(onnx_files):
    findings = check_onnx(onnx_files["train"])
    assert codes(findings).count("BN001") == 4
    assert all("training_mode=1" in finding.message for finding in findings if finding.code == "BN001")
    (dependence,) = [finding for finding in findings if finding.code == "BD001"]
    assert dependence.name == "output"
    assert float(re.search(r"by up to ([\d.e+-]+)", dependence.message).group(1)) > 1e-3


def test_train_mode_export_at_opset_12_is_recognised_by_its_statistics_outputs(trained_cnn, tmp_path):
    path = tmp_path / "train12.onnx"
    export_onnx(trained_cnn.train(), example_input("small_cnn"), path, training=True, opset=12)
    findings = check_onnx(path, measure_batch=False)
    assert codes(findings) == ["BN001"] * 4
    assert "statistics outputs" in findings[0].message


def _legacy_model(is_test: int) -> onnx.ModelProto:
    """Opset 6: BatchNormalization and Dropout chose training mode with is_test=0."""
    channels = 3
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "bias"),
        numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["normalised"], is_test=is_test),
        helper.make_node("Dropout", ["normalised"], ["y"], is_test=is_test, ratio=0.3),
    ]
    graph = helper.make_graph(
        nodes, "legacy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 4, 4])],
        initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])


def test_legacy_is_test_0_is_training_mode_for_batchnorm_and_dropout():
    findings = check_onnx(_legacy_model(is_test=0), measure_batch=False)
    assert codes(findings) == ["BN001", "DO001"]
    assert "is_test=0" in findings[0].message and "30%" in findings[1].message
    assert codes(check_onnx(_legacy_model(is_test=1), measure_batch=False)) == []


def test_batchnorm_whose_statistics_output_is_read_is_in_training_mode(onnx_files):
    model = onnx.load(onnx_files["eval"])
    batchnorm = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    batchnorm.output.extend(["stem_running_mean"])
    model.graph.output.append(helper.make_tensor_value_info("stem_running_mean", TensorProto.FLOAT, [8]))
    findings = check_onnx(model, measure_batch=False)
    assert named(findings, "BN001") == [batchnorm.name]
    assert "stem_running_mean" in findings[0].message


# Dropout


def test_dropout_in_train_mode_is_reported_with_its_rate():
    findings = check_model(dropout_model().train(), torch.zeros(2, 8))
    assert named(findings, "DO001") == ["2"]
    assert "25%" in findings[0].message
    assert "DO002" in codes(findings) and "BD001" not in codes(findings)  # a different mask for each run
    assert check_model(dropout_model().eval(), torch.zeros(2, 8)) == []


def test_dropout_with_nothing_to_drop_is_harmless_in_train_mode():
    model = nn.Sequential(nn.Linear(8, 2), nn.Dropout(0.0)).train()
    assert check_model(model, torch.zeros(2, 8)) == []


def drop_path(x, drop_prob: float = 0., training: bool = False, scale_by_keep: bool = True):
    """timm's ``layers/drop.py`` drop_path."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # work with diff dim tensors, not just 2D ConvNets
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm's DropPath (stochastic depth on a residual branch, per sample)."""

    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class StochasticDepth(nn.Module):
    """torchvision's StochasticDepth ("row" mode: per sample), its ``ops/stochastic_depth.py`` function inlined."""

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input):  # noqa: A002 - torchvision's name
        if not self.training or self.p == 0.0:
            return input
        survival_rate = 1.0 - self.p
        size = [input.shape[0]] + [1] * (input.ndim - 1) if self.mode == "row" else [1] * input.ndim
        noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
        if survival_rate > 0.0:
            noise.div_(survival_rate)
        return input * noise


class _Residual(nn.Module):
    def __init__(self, drop: nn.Module):
        super().__init__()
        self.linear, self.drop = nn.Linear(8, 8), drop

    def forward(self, x):
        return x + self.drop(self.linear(x))


@pytest.mark.parametrize("drop", [lambda: DropPath(0.2), lambda: StochasticDepth(0.2)], ids=["timm-drop-path", "torchvision-stochastic-depth"])
def test_a_drop_path_left_in_training_mode_is_reported(drop):
    """A fine-tune that froze its BatchNorms but left the model in train mode: found only as batch dependence
    (BD001, with an input shape given), and not at all without one."""
    model = _Residual(drop()).train()
    findings = check_model(model, torch.ones(4, 8), measure_batch=False)
    assert named(findings, "DO001") == ["drop"]
    assert "zeroes 20% of its inputs, by whole samples or blocks, at random" in findings[0].message
    assert check_model(model.eval(), torch.ones(4, 8), measure_batch=False) == []


@pytest.mark.parametrize("opset", [12, 17])
def test_dropout_exported_in_training_mode(opset, tmp_path):
    path = tmp_path / "dropout.onnx"
    export_onnx(dropout_model().train(), torch.zeros(3, 8), path, training=True, opset=opset)
    findings = check_onnx(path)
    assert codes(findings) == ["DO001", "DO002"]
    export_onnx(dropout_model().eval(), torch.zeros(3, 8), path, opset=opset)
    assert check_onnx(path) == []


class _FunctionalDropout(nn.Module):
    def __init__(self, training: bool | None):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.training_flag = training

    def forward(self, x):
        y = self.linear(x)
        # F.dropout's training defaults to True: the usual slip is to leave it out.
        return F.dropout(y, 0.5) if self.training_flag is None else F.dropout(y, 0.5, training=self.training)


def test_functional_dropout_active_in_eval_mode_is_random_outputs_not_batch_dependence(tmp_path):
    """F.dropout without training=self.training drops at inference: no module says so, only the outputs of two runs
    of one batch. It was BD001, "outputs depend on the batch"."""
    torch.manual_seed(0)
    model = _FunctionalDropout(None).eval()
    findings = check_model(model, torch.zeros(3, 8))
    (finding,) = findings
    assert finding.code == "DO002" and finding.name == "output"
    assert "the same batch run twice gives outputs that differ" in finding.message
    assert check_model(_FunctionalDropout(True).eval(), torch.zeros(3, 8)) == []
    path = tmp_path / "noise.onnx"
    noise = helper.make_node("RandomUniformLike", ["x"], ["u"], low=0.0, high=1.0)
    add = helper.make_node("Add", ["x", "u"], ["y"])
    graph = helper.make_graph(
        [noise, add],
        "noise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert codes(check_onnx(path)) == ["DO002"]


# Statistics


def test_fresh_model_has_untrained_statistics_in_pytorch_and_onnx(tmp_path):
    torch.manual_seed(0)
    fresh = SmallCNN(nn).eval()
    findings = check_model(fresh, example_input("small_cnn"))
    assert named(findings, "BN003") == SMALL_CNN_BATCHNORMS
    assert "num_batches_tracked is 0" in findings[0].message and "exactly 0" in findings[0].message
    path = tmp_path / "fresh.onnx"
    export_onnx(fresh, example_input("small_cnn"), path)
    assert codes(check_onnx(path)).count("BN003") == 4  # ONNX keeps no counter: found by the 0/1 values


def test_variance_zero_in_every_channel_is_statistics_never_filled_in_in_pytorch_and_onnx(trained_cnn, tmp_path):
    model = copy.deepcopy(trained_cnn).eval()
    model.block.bn1.running_var.zero_()
    findings = check_model(model, measure_batch=False)
    (finding,) = [f for f in findings if f.code == "BN003"]
    assert finding.name == "block.bn1" and "variance is exactly 0 in all 8 channels" in finding.message
    path = tmp_path / "zero_variance.onnx"
    export_onnx(model, example_input("small_cnn"), path)
    assert codes(check_onnx(path)).count("BN003") == 1
    # One dead channel is what training can give: no finding.
    model.block.bn1.running_var.copy_(trained_cnn.block.bn1.running_var)
    model.block.bn1.running_var[3] = 0
    assert "BN003" not in codes(check_model(model, measure_batch=False))


def test_a_zero_batch_counter_beside_trained_statistics_is_no_finding(trained_cnn):
    """What load_state_dict leaves from a checkpoint without the counter (converted weights, safetensors): the
    module's own count, 0 in a fresh model. It was BN003, "never updated by training"."""
    state = {key: value for key, value in trained_cnn.state_dict().items() if not key.endswith("num_batches_tracked")}
    torch.manual_seed(0)
    loaded = SmallCNN(nn)
    loaded.load_state_dict(state)
    assert int(loaded.block.bn1.num_batches_tracked) == 0
    assert "BN003" not in codes(check_model(loaded.eval(), measure_batch=False))


@pytest.mark.parametrize(
    ("buffer", "value", "expected"),
    [("running_mean", math.nan, "NaN"), ("running_var", -0.5, "negative"), ("running_var", math.inf, "NaN or Inf")],
)
def test_broken_statistics_are_errors(trained_cnn, buffer, value, expected):
    getattr(trained_cnn.block.bn2, buffer)[3] = value
    findings = check_model(trained_cnn, measure_batch=False)
    assert named(findings, "BN004") == ["block.bn2"]
    assert expected in findings[0].message and "channel 3" in findings[0].message


def test_broken_statistics_in_onnx(trained_cnn, tmp_path):
    trained_cnn.stem[1].running_var[0] = -1.0
    path = tmp_path / "broken.onnx"
    export_onnx(trained_cnn, example_input("small_cnn"), path)
    findings = check_onnx(path, measure_batch=False)
    assert codes(findings).count("BN004") == 1
    assert codes(findings).count("BN006") == 3  # the other three still fold; the broken one does not


def test_near_zero_variance_with_large_scale_is_a_warning(trained_cnn):
    trained_cnn.down[1].running_var[5] = 0.0
    trained_cnn.down[1].weight.data[5] = 100.0  # 100 / sqrt(1e-5) ~ 3.2e4
    findings = check_model(trained_cnn, measure_batch=False)
    assert codes(findings) == ["BN005", "BN007"]  # the same channel also makes per-tensor int8 lossy once folded
    assert findings[0].severity == "warning" and "channel 5" in findings[0].message and "3.16e+04" in findings[0].message


def test_batchnorm_without_running_statistics(trained_cnn):
    trained_cnn.block.bn1 = nn.BatchNorm2d(8, track_running_stats=False).eval()
    findings = check_model(trained_cnn, example_input("small_cnn"))
    assert named(findings, "BN002") == ["block.bn1"]
    assert "BN001" not in codes(findings)  # eval mode, yet batch statistics
    assert "BD001" in codes(findings)


# Batch dependence: what can and cannot be measured


def test_batch_fixed_at_one_cannot_be_measured(trained_cnn, tmp_path):
    path = tmp_path / "batch1.onnx"
    export_onnx(trained_cnn.train(), example_input("small_cnn", batch=1), path, training=True, dynamic_batch=False)
    findings = check_onnx(path)
    assert "BD002" in codes(findings) and "BD001" not in codes(findings)
    assert "fixed" in findings[-1].message
    # The advice is what works for a fixed batch: --input-shape cannot change it, re-exporting can.
    assert "export the model with a batch axis that is not fixed" in findings[-1].describe()
    assert "--input-shape cannot change a size the model fixes" in findings[-1].message
    shaped = invoke("--format", "json", "--input-shape", "input=4,3,16,16", path)
    assert "BD001" not in shaped.stdout  # a batch of 4 is not runnable on this model: the advice above is right


def test_fixed_batch_is_measured_against_copies_of_each_sample(trained_cnn, tmp_path):
    path = tmp_path / "batch2.onnx"
    export_onnx(trained_cnn, example_input("small_cnn", batch=2), path, dynamic_batch=False)
    assert "BD001" not in codes(check_onnx(path))
    export_onnx(trained_cnn.train(), example_input("small_cnn", batch=2), path, training=True, dynamic_batch=False)
    (dependence,) = [finding for finding in check_onnx(path) if finding.code == "BD001"]
    assert "batch of 2 copies of itself" in dependence.message


def test_module_without_example_inputs_is_not_measured(trained_cnn):
    assert codes(check_model(trained_cnn.train())) == ["BN001"] * 4 + ["BD002"]


def test_named_input_shape_and_batch_size_are_used_for_onnx(onnx_files):
    findings = check_onnx(onnx_files["train"], input_shapes={"input": [1, 3, 16, 16]}, batch_size=3)
    assert "batch of 3" in next(finding for finding in findings if finding.code == "BD001").message
    findings = check_onnx(onnx_files["train"], input_shapes={"input": [1, 3, 8, 8]})
    (not_run,) = [finding for finding in findings if finding.code.startswith("BD")]
    assert not_run.code == "BD002" and "does not run" in not_run.message  # the model is exported for 16x16 images
    with pytest.raises(bnfold.onnx_fold.io.InputError, match="unknown input"):
        check_onnx(onnx_files["train"], input_shapes={"image": [1, 3, 8, 8]})


# The command: formats, exit codes, selection


def test_clean_onnx_exits_0_with_info_findings(onnx_files):
    result = invoke(onnx_files["eval"])
    assert result.exit_code == 0, result.output
    assert "BN006 info /stem/stem.1/BatchNormalization: `bnfold` would fold it" in result.stdout


def test_text_lines_have_path_code_severity_name_message_and_hint(onnx_files):
    result = invoke(onnx_files["train"])
    assert result.exit_code == 1
    line = next(line for line in result.stdout.splitlines() if " BN001 " in line)
    assert line == (
        f"{onnx_files['train']}: BN001 error /stem/stem.1/BatchNormalization: training mode (training_mode=1): it normalises "
        "with the statistics of the current batch"
    )
    # Each code's hint once, after the findings, with how many findings it serves.
    assert result.stdout.splitlines()[-3:] == [
        f"BN001 (4): {CODES['BN001'].hint}",
        f"BD001 (1): {CODES['BD001'].hint}",
        "5 error(s) in 1 checked model(s)",
    ]
    assert result.stdout.count(CODES["BN001"].hint) == 1


def test_json_output(onnx_files):
    result = invoke("--format", "json", onnx_files["train"], onnx_files["eval"])
    document = json.loads(result.stdout)
    assert result.exit_code == 1
    assert document["summary"] == {"checked": 2, "unreadable": 0, "error": 5, "warning": 0, "info": 4}
    first = document["findings"][0]
    assert set(first) == {"path", "code", "severity", "name", "message", "hint"}
    assert (first["path"], first["code"], first["severity"]) == (onnx_files["train"], "BN001", "error")


def test_github_annotations(onnx_files, tmp_path):
    unreadable = tmp_path / "broken.onnx"
    unreadable.write_bytes(b"not a model")
    result = invoke("--format", "github", onnx_files["train"], onnx_files["eval"], unreadable)
    lines = result.stdout.splitlines()
    assert result.exit_code == 2
    assert lines and all(GITHUB_COMMAND.match(line) for line in lines), lines
    assert {line.split(" ")[0] for line in lines} == {"::error", "::notice"}
    assert any(line.startswith(f"::error file={unreadable},title=unreadable::") for line in lines)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (["--select", "BN001"], {"BN001"}),
        (["--select", "bd"], {"BD001"}),
        (["--select", "BN,BD", "--ignore", "BN001"], {"BD001", "BN006"}),
        (["--ignore", "BD"], {"BN001", "BN006"}),
    ],
)
def test_select_and_ignore_by_code_or_prefix(onnx_files, selection, expected):
    result = invoke("--format", "json", *selection, onnx_files["train"], onnx_files["eval"])
    assert {finding["code"] for finding in json.loads(result.stdout)["findings"]} == expected


def test_ignoring_the_batch_codes_skips_the_measurement(monkeypatch, onnx_files):
    def fail(*args, **kwargs):
        raise AssertionError("measured although BD codes are ignored")

    monkeypatch.setattr(bnfold.checks.onnx_inspect, "measure_batch_dependence", fail)
    assert invoke("--ignore", "BD", onnx_files["train"]).exit_code == 1


def test_only_error_findings_fail_the_build(onnx_files):
    assert invoke("--select", "BN006", onnx_files["train"]).exit_code == 0
    assert invoke("--ignore", "BN001,BD001", onnx_files["train"]).exit_code == 0
    assert invoke("--select", "BD001", onnx_files["train"]).exit_code == 1


def test_warning_alone_exits_0(trained_cnn, tmp_path):
    trained_cnn.down[1].running_var[5] = 0.0
    trained_cnn.down[1].weight.data[5] = 100.0
    path = tmp_path / "warning.onnx"
    export_onnx(trained_cnn, example_input("small_cnn"), path)
    result = invoke("--ignore", "BN006", path)
    assert result.exit_code == 0
    assert " BN005 warning " in result.stdout


@pytest.mark.parametrize("option", ["--select", "--ignore"])
def test_unknown_code_is_a_usage_error(onnx_files, option):
    result = invoke(option, "BN001,XY", onnx_files["eval"])
    assert result.exit_code == 2
    assert "'XY' is not a finding code" in result.output


def test_unreadable_inputs_exit_2_after_checking_the_others(onnx_files, tmp_path):
    result = invoke(onnx_files["eval"], tmp_path / "missing.onnx", tmp_path / "missing.pt2")
    assert result.exit_code == 2
    assert f"{tmp_path / 'missing.onnx'}: no such file" in result.stderr
    assert "BN006" in result.stdout


def test_nothing_to_check_is_a_usage_error():
    assert invoke().exit_code == 2


# The command: PyTorch loading routes


@pytest.fixture(scope="module")
def exported_programs(tmp_path_factory) -> dict[str, str]:
    """.pt2 archives of the trained small_cnn: eval and train mode with a dynamic batch, eval with batch 2."""
    directory = tmp_path_factory.mktemp("pt2")
    example = (example_input("small_cnn"),)
    dynamic = ({0: torch.export.Dim("batch")},)
    files = {}
    for name, training, shapes in (("eval", False, dynamic), ("train", True, dynamic), ("eval_batch2", False, None)):
        files[name] = str(directory / f"{name}.pt2")
        model = trained("small_cnn").train(training)
        torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), files[name])
    return files


def test_torch_export_archives_with_their_own_example_inputs(exported_programs):
    clean = invoke("--format", "json", exported_programs["eval"], exported_programs["eval_batch2"])
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.stdout)["findings"] == []  # measured (no BD002), nothing found
    train = invoke("--format", "json", exported_programs["train"])
    found = [(finding["code"], finding["name"]) for finding in json.loads(train.stdout)["findings"]]
    assert train.exit_code == 1
    assert found == [("BN001", name) for name in SMALL_CNN_BATCHNORMS] + [("BD001", "output")]


def test_torchscript_archives_are_checked_when_trusted(trained_cnn, tmp_path):
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(trained_cnn), path)
    assert invoke("--trust-pickle", "--input-shape", "1,3,16,16", path).exit_code == 0
    torch.jit.save(torch.jit.script(trained_cnn.train()), path)
    result = invoke("--trust-pickle", "--format", "json", "--input-shape", "1,3,16,16", path)
    assert result.exit_code == 1
    assert [finding["code"] for finding in json.loads(result.stdout)["findings"]] == ["BN001"] * 4 + ["BD001"]


def test_state_dict_with_factory(trained_cnn, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(trained_cnn.state_dict(), path)
    result = invoke("--factory", "check_helpers:small_cnn_architecture", "--input-shape", "1,3,16,16", path)
    assert result.exit_code == 0, result.output
    assert "no findings" in result.stdout


def test_state_dict_is_checked_in_eval_mode_whatever_mode_the_factory_builds(trained_cnn, tmp_path):
    """A state-dict stores no mode: a factory's fresh module (training mode) must not make every BN a BN001."""
    path = tmp_path / "weights.pt"
    torch.save(trained_cnn.state_dict(), path)
    result = invoke("--format", "json", "--factory", "check_helpers:small_cnn_as_built", "--input-shape", "1,3,16,16", path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["findings"] == []


def test_state_dict_without_factory_is_an_input_error(trained_cnn, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(trained_cnn.state_dict(), path)
    result = invoke(path)
    assert result.exit_code == 2
    assert "is a state-dict: give the factory that builds its architecture (--factory" in result.stderr


def test_model_callable(tmp_path):
    result = invoke("--model", "check_helpers:trained_small_cnn_in_train_mode", "--input-shape", "1,3,16,16")
    assert result.exit_code == 1
    assert "check_helpers:trained_small_cnn_in_train_mode: BN001 error stem.1:" in result.stdout
    assert invoke("--model", "check_helpers:trained_small_cnn", "--input-shape", "1,3,16,16").exit_code == 0


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("check_helpers:not_a_model", "returned a int"),
        ("check_helpers:missing", "cannot import"),
        ("check_helpers", "module:callable"),
    ],
)
def test_bad_model_callable_is_an_input_error(spec, problem):
    result = invoke("--model", spec)
    assert result.exit_code == 2
    assert problem in result.stderr


def test_model_callable_is_imported_from_the_current_directory(tmp_path, monkeypatch):
    module = "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Dropout(0.5))\n"
    (tmp_path / "my_models_for_check.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    result = invoke("--model", "my_models_for_check:build", "--select", "DO")
    assert result.exit_code == 1, result.output
    assert "DO001 error 0:" in result.stdout


def test_pickled_module_is_refused_unless_trusted(trained_cnn, tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(trained_cnn.train(), path)
    refused = invoke(path)
    assert refused.exit_code == 2
    assert "is a pickled module (it needs bnfold.testing.SmallCNN)" in refused.stderr
    assert "--trust-pickle" in refused.stderr
    trusted = invoke("--trust-pickle", "--ignore", "BD", path)
    assert trusted.exit_code == 1
    assert trusted.stdout.count(" BN001 error ") == 4


def test_a_file_that_is_no_model_is_an_input_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a model")
    result = invoke(path)
    assert result.exit_code == 2
    assert "not a readable PyTorch or ONNX file" in result.stderr


# The assertion helper


def test_assert_inference_ready_lists_the_error_findings(trained_cnn, onnx_files):
    assert_inference_ready(trained_cnn, example_input("small_cnn"))
    assert_inference_ready(onnx_files["eval"])  # info findings pass
    with pytest.raises(AssertionError, match=r"5 error\(s\)") as failure:
        assert_inference_ready(trained_cnn.train(), example_input("small_cnn"))
    assert str(failure.value).count("BN001") == 4 and "BD001" in str(failure.value)
    with pytest.raises(AssertionError, match="BN001 /stem/stem.1/BatchNormalization"):
        assert_inference_ready(onnx.load(onnx_files["train"]))


# Packaging


def test_pre_commit_hooks_run_the_check_command_on_model_files():
    """Two hooks: ONNX files with the light install (no torch), .pt2 archives with torch added."""
    text = (Path(__file__).parent.parent / ".pre-commit-hooks.yaml").read_text()
    hooks = {}
    for block in re.split(r"^- ", text, flags=re.MULTILINE)[1:]:
        fields = dict(re.findall(r"^ *(id|entry|files|additional_dependencies): ([^#\n]+?) *(?:#.*)?$", block, flags=re.MULTILINE))
        hooks[fields.pop("id")] = fields
    assert set(hooks) == {"bnfold-check", "bnfold-check-pytorch"}
    for hook in hooks.values():
        program, command = hook["entry"].split()
        assert program == "bnfold" and main.commands[command] is bnfold.check_command.check
    onnx_files, pytorch_files = (re.compile(hooks[name]["files"]) for name in ("bnfold-check", "bnfold-check-pytorch"))
    assert onnx_files.search("models/resnet.onnx") and not onnx_files.search("model.pt2") and not onnx_files.search("train.py")
    assert pytorch_files.search("model.pt2") and not pytorch_files.search("models/resnet.onnx")
    assert "additional_dependencies" not in hooks["bnfold-check"]
    assert "torch" in hooks["bnfold-check-pytorch"]["additional_dependencies"]


def test_github_annotation_stays_on_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a:b.onnx").write_bytes(b"")
    finding = bnfold.checks.Finding("BD002", "", "line one\nline two, 100%").at("dir/a:b.onnx")
    (line,) = format_github(CheckResults([finding], checked=1)).splitlines()
    assert line == f"::notice file=dir/a%3Ab.onnx,title=BD002::<model>: line one\\nline two, 100%25 ({CODES['BD002'].hint})"


def test_github_annotation_of_a_model_spec_names_it_in_the_title():
    """A --model spec is no file for GitHub to attach the annotation to (it looked for "pkg.models%3Amake")."""
    finding = bnfold.checks.Finding("BN001", "bn", "training mode").at("pkg.models:make")
    (line,) = format_github(CheckResults([finding], checked=1)).splitlines()
    assert line.startswith("::error title=BN001 in pkg.models%3Amake::bn: training mode")


def test_registering_the_command_keeps_torch_out_of_cli_start_up():
    probe = "import sys, bnfold.cli; print('torch' in sys.modules)"  # torch costs `bnfold fold` seconds
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_top_level_check_dispatches_on_the_model_kind(tmp_path):
    model = trained_fixture("mlp")
    assert bnfold.check(model, (example_input("mlp"),)) == []
    path = tmp_path / "mlp.onnx"
    export_onnx(model, example_input("mlp"), path)
    assert {f.code for f in bnfold.check(path)} == {"BN006"}
    model.train()
    with pytest.raises(AssertionError, match="BN001"):
        bnfold.assert_inference_ready(model, (example_input("mlp"),))


def test_a_directory_is_searched_for_models_git_ignored_files_left_out(onnx_files, tmp_path):
    repository = tmp_path / "models"
    (repository / "nested").mkdir(parents=True)
    (repository / "build").mkdir()
    shutil.copy(onnx_files["eval"], repository / "nested" / "good.onnx")
    shutil.copy(onnx_files["train"], repository / "build" / "ignored.onnx")
    (repository / "notes.txt").write_text("not a model")
    plain = invoke("--format", "json", repository)
    assert plain.exit_code == 1  # outside git every model is checked, the training-mode one included
    assert json.loads(plain.stdout)["summary"]["checked"] == 2
    subprocess.run(["git", "init", "-q", str(repository)], check=True)
    (repository / ".gitignore").write_text("build/\n")
    in_git = invoke("--format", "json", repository)
    assert in_git.exit_code == 0, in_git.output
    report = json.loads(in_git.stdout)
    assert report["summary"]["checked"] == 1
    assert {finding["path"] for finding in report["findings"]} == {str(repository / "nested" / "good.onnx")}


def test_python_api_takes_a_factory_and_reports_a_missing_file_as_file_not_found(trained_cnn, tmp_path):
    from check_helpers import small_cnn_as_built

    path = tmp_path / "weights.pt"
    torch.save(trained_cnn.state_dict(), path)
    assert bnfold.check(path, torch.zeros(1, 3, 16, 16), factory=small_cnn_as_built) == []
    assert_inference_ready(path, torch.zeros(1, 3, 16, 16), factory="check_helpers:small_cnn_as_built")
    for missing in (tmp_path / "absent.onnx", tmp_path / "absent.pt"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            bnfold.check(missing)
        with pytest.raises(bnfold.InputError):
            bnfold.check(missing)


def test_user_code_that_exits_or_fails_to_import_is_reported_and_the_other_inputs_still_checked(tmp_path, monkeypatch):
    """sys.exit in a --model callable ended the whole check with exit 0 and no output; an import that raised
    something other than ImportError was an internal error."""
    (tmp_path / "broken_on_import.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("--model", "check_helpers:exits", "--model", "broken_on_import:build",
                    "--model", "check_helpers:trained_small_cnn_in_train_mode", "--ignore", "BD")  # fmt: skip
    assert result.exit_code == 2
    assert "check_helpers:exits: --model: calling it raised SystemExit: 0" in result.stderr
    assert "broken_on_import:build: --model: cannot import (importing it raised RuntimeError: needs a GPU)" in result.stderr
    assert "BN001" in result.stdout and "internal error" not in result.stderr


def test_models_deepcopy_cannot_copy_or_lazy_ones_get_findings_not_errors():
    result = invoke("--model", "check_helpers:holds_a_lock", "--input-shape", "2,3,16,16")
    assert result.exit_code == 0, result.output
    assert "BD002 info <model>: batch dependence not measured: the model cannot be copied to run it (TypeError:" in result.stdout
    lazy = invoke("--model", "check_helpers:lazy_batchnorm", "--input-shape", "2,3,16,16")
    assert lazy.exit_code in (0, 1) and "internal error" not in lazy.stderr, lazy.output


def test_a_checkpoint_without_batch_counts_is_not_untrained(trained_cnn, tmp_path):
    """Checkpoints from before num_batches_tracked, and weights converted from other frameworks, have no count:
    torch's loader fills in 0, which is not the file's word that the statistics were never trained."""
    state = {key: value for key, value in trained_cnn.state_dict().items() if not key.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    result = invoke(path, "--factory", "check_helpers:small_cnn_architecture", "--ignore", "BD")
    assert result.exit_code == 0 and "BN003" not in result.stdout, result.output
    untrained = {key: value for key, value in SmallCNN(nn).state_dict().items() if not key.endswith("num_batches_tracked")}
    torch.save(untrained, path)
    result = invoke(path, "--factory", "check_helpers:small_cnn_architecture", "--ignore", "BD")
    assert result.exit_code == 1 and "running mean is exactly 0 and variance exactly 1" in result.stdout


def test_batchnorm_in_a_model_local_function_is_inspected(tmp_path):
    """torch.onnx.export's export_modules_as_functions puts each BatchNorm in a function the graph calls."""
    channels = 4
    statistics = {"scale": np.ones(channels), "bias": np.zeros(channels), "mean": np.zeros(channels), "var": np.ones(channels)}
    inits = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in statistics.items()]
    body = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn", training_mode=1)
    function = helper.make_function("local", "TrainingBatchNorm", ["x", "scale", "bias", "mean", "var"], ["y"], [body],
                                    [helper.make_opsetid("", 15)])  # fmt: skip
    call = helper.make_node("TrainingBatchNorm", ["input", "scale", "bias", "mean", "var"], ["output"], domain="local", name="call")
    graph = helper.make_graph([call], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 2, 2])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, 2, 2])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("local", 1)], functions=[function])
    model.ir_version = 8
    path = tmp_path / "functions.onnx"
    onnx.save(model, path)
    result = invoke(path, "--ignore", "BD")
    assert result.exit_code == 1
    assert " BN001 error " in result.stdout and " BN003 error " in result.stdout


def test_a_scripted_batchnorm_subclass_is_a_batchnorm(tmp_path):
    class BatchNormAct(nn.BatchNorm2d):  # a subclass (timm's BatchNormAct2d): TorchScript keeps only its own name
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.InstanceNorm2d(4, track_running_stats=True))
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model.train()), path)
    result = invoke(path, "--trust-pickle", "--ignore", "BD")
    assert result.exit_code == 1
    assert named_lines(result.stdout, "BN001") == ["1"]  # the subclass; not the InstanceNorm, whose state is alike


def named_lines(stdout: str, code: str) -> list[str]:
    return [line.split(f" {code} error ")[1].split(":")[0] for line in stdout.splitlines() if f" {code} error " in line]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_repository_inside_a_checked_folder_runs_no_command_of_its_own(tmp_path, onnx_files):
    """A folder of models may come with a .git whose config names a command: git ran core.fsmonitor's as check listed
    the folder's files."""
    tree, marker = tmp_path / "tree", tmp_path / "command-ran"
    tree.mkdir()
    shutil.copy(onnx_files["eval"], tree / "model.onnx")
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    subprocess.run(["git", "-C", str(tree), "config", "core.fsmonitor", f"touch {marker}; echo"], check=True)
    result = invoke(tree, "--ignore", "BD")
    assert result.exit_code == 0, result.output
    assert "1 checked model" in result.output
    assert not marker.exists()


def test_a_directory_walk_stays_inside_the_directory(tmp_path, onnx_files):
    """A file symlink out of the tree is not followed (nothing outside what was named is read); a directory with
    nothing to check says so, where a CI gate pointed at the wrong folder would pass in silence."""
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    tree.mkdir()
    outside.mkdir()
    shutil.copy(onnx_files["train"], outside / "secret.onnx")
    (tree / "link.onnx").symlink_to(outside / "secret.onnx")
    result = invoke(tree)
    assert result.exit_code == 0 and "link.onnx" not in result.output
    assert f"bnfold: warning: {tree}: no model files (.onnx, .pt2) to check" in result.stderr


def test_dropout_whose_training_mode_defaults_to_true_is_in_training_mode(tmp_path):
    """training_mode as a graph input with an initializer: an overridable default, true unless the caller feeds false."""
    mode = numpy_helper.from_array(np.array(True), "training")
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x", "", "training"], ["y"], name="drop")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]), helper.make_tensor_value_info("training", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [mode],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    [finding] = [f for f in check_onnx(model, measure_batch=False) if f.code == "DO001"]
    assert "its training_mode input 'training' defaults to true" in finding.message
    mode.CopyFrom(numpy_helper.from_array(np.array(False), "training"))
    model.graph.initializer[0].CopyFrom(mode)
    assert not [f for f in check_onnx(model, measure_batch=False) if f.code == "DO001"]


def test_a_batchnorm_fed_its_own_batch_statistics_is_bn002():
    """How torch.onnx's dynamo exporter writes track_running_stats=False: mean and variance computed from the
    BatchNorm's own input. It was found only through the batch dependence (BD001), so not at batch size 1."""
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "spatial"], ["m4"]),
        helper.make_node("Sub", ["x", "m4"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2", "axes"], ["v"], keepdims=0),
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "m", "v"], ["y"], name="bn"),
    ]
    inits = [numpy_helper.from_array(np.array(a, np.int64), n) for n, a in (("axes", [0, 2, 3]), ("spatial", [0, 2, 3]))]
    inits += [numpy_helper.from_array(np.ones(4, np.float32), "scale"), numpy_helper.from_array(np.zeros(4, np.float32), "bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    findings = check_onnx(model, measure_batch=False)
    assert codes(findings) == ["BN002"] and findings[0].name == "bn"


def test_weight_standardisation_is_no_batchnorm_in_training_mode(tmp_path):
    """BiT's StdConv2d standardises its weight with a training-mode batch_norm: exported, a BatchNormalization in
    training mode (or fed its input's own statistics), which check took for a BatchNorm left in training mode (BN001)
    or without running statistics (BN002) on a correct eval-mode model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from torch_architectures import BitStyleNet

    from bnfold.architectures import randomize_batchnorm_statistics

    torch.manual_seed(0)
    model = BitStyleNet().eval()
    randomize_batchnorm_statistics(model, torch.Generator().manual_seed(0))
    assert check_model(model, (torch.randn(2, 3, 8, 8),)) == []
    export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "bit.onnx")
    assert check_onnx(tmp_path / "bit.onnx") == [finding for finding in check_onnx(tmp_path / "bit.onnx") if finding.code == "BN006"]
    _, report = bnfold.fold_onnx(tmp_path / "bit.onnx")
    standardising = [skip for skip in report.skips if "weight standardisation" in skip.reason]
    assert len(standardising) == 2 and all("computed from initializers alone, not data" in skip.reason for skip in standardising)


class _RepBlock(nn.Module):
    """RepVGG's block (TextNet in transformers): a conv -> BatchNorm branch beside a BatchNorm of the input alone
    (rbr_identity), which the fold leaves; one channel of the latter has a large scale (variance 1e-4)."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn, self.rbr_identity = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.rbr_identity(x))


def test_no_bn007_for_a_batchnorm_the_fold_leaves(tmp_path):
    """BN007 says what a fold would do to int8 and float16: it was estimated for rbr_identity, which the fold leaves
    ("per-tensor int8 of the folded layer would lose about 40 dB"); without example inputs the estimate stays."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), _RepBlock()).eval()
    with torch.no_grad():
        for batchnorm in (model[2].bn, model[2].rbr_identity):
            batchnorm.running_var.uniform_(0.5, 2.0)
            batchnorm.running_mean.normal_()
        model[2].rbr_identity.running_var[3] = 1e-4
    x = torch.randn(1, 3, 16, 16)
    assert [skip.batchnorm for skip in bnfold.fold(model, x).report.skips] == ["2.rbr_identity"]
    assert [finding.code for finding in check_model(model, x, measure_batch=False)] == []
    assert [(finding.code, finding.name) for finding in check_model(model, measure_batch=False)] == [("BN007", "2.rbr_identity")]
    export_onnx(model, x, tmp_path / "rep.onnx")
    assert [finding.code for finding in check_onnx(tmp_path / "rep.onnx", measure_batch=False)] == ["BN006"]
