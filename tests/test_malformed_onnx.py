"""Malformed ONNX models, one crafted per kind: a pair that makes no sense is left with a skip code and a
reason; a model that cannot be used at all raises bnfold's InputError. Never a traceback."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_models import batchnorm_node, batchnorm_parameters, fast_path_agrees, initializer

import bnfold
from bnfold.onnx_fold.io import InputError, load_inline_model, load_model
from bnfold.verification import VerificationError


def conv_bn(weight_shape=(3, 2, 3, 3), channels=3, group=None, epsilon=None, name="bn") -> onnx.ModelProto:
    r = np.random.default_rng(0)
    conv = {"group": group} if group is not None else {}
    bn = {"epsilon": epsilon} if epsilon is not None else {}
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **conv), batchnorm_node("y", "z", "bn", **bn)]
    nodes[1].name = name
    inits = [initializer("W", r.normal(size=weight_shape).astype(np.float32)), *batchnorm_parameters(channels, "bn", r)]
    return _model(nodes, inits)


def _model(nodes, inits) -> onnx.ModelProto:
    """Without onnx's checker or shape inference, which refuse some of these models before bnfold sees them."""
    graph = helper.make_graph(nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info(n.output[0] if n.output else "z", TensorProto.FLOAT, None) for n in nodes[-1:]], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def skips(model: onnx.ModelProto) -> list[tuple[str, str]]:
    fast_path_agrees(model)
    _, report = bnfold.fold_onnx(model, verify=False)
    assert not report.folds
    return [(skip.code, skip.reason) for skip in report.skips]


def tensor(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_short_raw_data_is_an_input_error(tmp_path):
    model = conv_bn()
    weight = tensor(model, "W")
    weight.raw_data = weight.raw_data[:-4]
    with pytest.raises(InputError, match="tensor 'W' is unreadable"):
        bnfold.fold_onnx(model, verify=False)
    path = tmp_path / "short.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=str(path)):
        bnfold.fold_onnx(path, verify=False)
    with pytest.raises(InputError):
        bnfold.check(path)


# Large weights make the command line's loader give onnx's checker one-element stand-ins for the tensors.
@pytest.mark.parametrize("weight_shape", [(3, 2, 3, 3), (64, 2, 16, 16)], ids=["small", "large"])
def test_the_command_lines_loader_refuses_what_onnxs_checker_refuses(tmp_path, weight_shape):
    path = tmp_path / "model.onnx"
    model = conv_bn(weight_shape, channels=weight_shape[0])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    path.write_bytes(model.SerializeToString())
    assert load_inline_model(path) == model
    weight = tensor(model, "W")
    weight.raw_data = weight.raw_data[:-4]
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"raw_data size \(\d+ bytes\) is too small"):
        load_inline_model(path)
    weight.raw_data += bytes(4)
    model.graph.node[0].op_type = "Convolution"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="No Op registered for Convolution"):
        load_inline_model(path)


def test_wrong_typed_data_field_is_an_input_error():
    model = conv_bn()
    scale = tensor(model, "bn_scale")
    scale.ClearField("raw_data")
    scale.int64_data.extend([1, 2, 3])  # a FLOAT tensor keeps its values in float_data or raw_data
    with pytest.raises(InputError, match="tensor 'bn_scale' is unreadable"):
        bnfold.fold_onnx(model, verify=False)


def test_batchnorm_scale_of_the_wrong_length_is_a_channel_mismatch():
    model = conv_bn()
    scale = tensor(model, "bn_scale")
    scale.CopyFrom(initializer("bn_scale", np.ones(2, np.float32)))
    [(code, reason)] = skips(model)
    assert code == "channel-mismatch" and "2/3/3/3 values" in reason


def test_batchnorm_scale_of_rank_two_is_a_channel_mismatch():
    """[2, 2] holds four values for the conv's four channels, but BatchNormalization takes [C]: onnxruntime
    refuses the model, and a fold would turn it into one it runs."""
    model = conv_bn(weight_shape=(4, 2, 3, 3), channels=4)
    tensor(model, "bn_scale").CopyFrom(initializer("bn_scale", np.ones((2, 2), np.float32)))
    [(code, reason)] = skips(model)
    assert code == "channel-mismatch" and "scale of bn has shape [2, 2]" in reason


def test_check_reports_statistics_that_do_not_fit_and_refuses_ones_that_are_not_numbers(tmp_path):
    """Models onnx's checker accepts: the check gives BN004 for statistics of mismatched shapes, nothing about
    a BatchNorm of no channels, and names the file of a string scale as unusable."""
    mismatched = conv_bn()
    tensor(mismatched, "bn_scale").CopyFrom(initializer("bn_scale", np.ones(2, np.float32)))
    [finding] = [f for f in bnfold.check(mismatched) if f.code.startswith("BN")]
    assert finding.code == "BN004" and "weight of shape [2], bias of shape [3]" in finding.message
    empty = conv_bn(weight_shape=(0, 2, 3, 3), channels=0)
    assert not [f for f in bnfold.check(empty) if f.code.startswith("BN")]
    strings = conv_bn()
    scale = tensor(strings, "bn_scale")
    scale.ClearField("raw_data")
    scale.data_type = TensorProto.STRING
    scale.string_data.extend([b"a", b"b", b"c"])
    strings.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    path = tmp_path / "strings.onnx"
    path.write_bytes(strings.SerializeToString())
    with pytest.raises(InputError, match=f"{path}: BatchNorm bn: input 'bn_scale' holds string values, not numbers"):
        bnfold.check(path)


@pytest.mark.parametrize("group", [0, -1, 2])
def test_conv_group_that_does_not_divide_the_channels_is_a_channel_mismatch(group):
    [(code, reason)] = skips(conv_bn(group=group))
    assert code == "channel-mismatch" and f"group={group}" in reason


@pytest.mark.parametrize("channels,words", [(0, "0/0/0/0 values"), (3, "empty weight, of shape [0, 2, 3, 3]")])
def test_zero_channels_are_a_channel_mismatch(channels, words):
    [(code, reason)] = skips(conv_bn(weight_shape=(0, 2, 3, 3), channels=channels))
    assert code == "channel-mismatch" and words in reason


def test_one_dimensional_conv_weight_is_a_channel_mismatch():
    [(code, reason)] = skips(conv_bn(weight_shape=(3,)))
    assert code == "channel-mismatch" and "1-D weight" in reason


def test_non_numeric_epsilon_is_refused_and_a_missing_one_is_the_default():
    [(code, reason)] = skips(conv_bn(epsilon="tiny"))
    assert code == "unfoldable-statistics" and "epsilon attribute of bn is STRING" in reason
    _, report = bnfold.fold_onnx(conv_bn(), verify=False)
    assert len(report.folds) == 1


def test_batchnorm_without_outputs_is_left():
    model = conv_bn()
    del model.graph.node[1].output[:]
    model.graph.output[0].name = "y"
    [(code, reason)] = skips(model)
    assert code == "no-foldable-neighbour" and "has no output" in reason


def test_over_long_names_fold():
    long = "n" * 100_000
    _, report = bnfold.fold_onnx(conv_bn(name=long), verify=True)
    assert [fold.batchnorm for fold in report.folds] == [long]


def test_names_that_are_not_utf8_are_an_input_error(tmp_path):
    data = conv_bn(name="bn\u00e9").SerializeToString().replace("bn\u00e9".encode(), b"bn\xff\xfe")
    model = onnx.ModelProto.FromString(data)
    with pytest.raises(InputError, match="not UTF-8"):
        bnfold.fold_onnx(model, verify=False)
    path = tmp_path / "bad_name.onnx"
    path.write_bytes(data)
    for call in (lambda: bnfold.fold_onnx(path, verify=False), lambda: bnfold.check(path)):
        with pytest.raises(InputError):
            call()


@pytest.mark.parametrize("verify", [False, True])
def test_an_undefined_element_type_is_an_input_error_with_or_without_verification(verify):
    """The fast path would fold it and leave verification to trip over the type: it declines instead."""
    model = conv_bn()
    model.graph.input[0].type.tensor_type.elem_type = 65  # no ONNX version defines it
    with pytest.raises(InputError, match="65 is not a valid DataType"):
        bnfold.fold_onnx(model, verify=verify)


@pytest.mark.parametrize("between", [None, "Identity"], ids=["fast-path", "pass"])
def test_a_model_without_outputs_fails_verification_for_comparing_nothing(between):
    # onnxruntime refuses to run a model without outputs, or to build a session of the pass's result (a graph
    # left empty): an internal error (exit 2, "please report it").
    model = conv_bn()
    if between:
        model.graph.node.insert(1, helper.make_node(between, ["y"], ["between"]))
        model.graph.node[2].input[0] = "between"
    del model.graph.output[:]
    with pytest.raises(VerificationError, match="nothing was compared: the model has no outputs"):
        bnfold.fold_onnx(model)


@pytest.mark.parametrize(
    "layout,words",
    [(helper.make_node("Flatten", ["y"], ["f"], axis=2.5), "axis attribute of Flatten is FLOAT, not INT"),
     (helper.make_node("Flatten", ["y"], ["f"], axis=-4), "axis -4 is out of range for its 3-D input"),
     (helper.make_node("Transpose", ["y"], ["f"], perm=[0.0, 2.0, 1.0]), "perm attribute of Transpose is FLOATS, not INTS"),
     (helper.make_node("Reshape", ["y", "target"], ["f"]), "target shape of Reshape is float32, not int64")],
    ids=["flatten-float-axis", "flatten-axis-out-of-range", "transpose-float-perm", "reshape-float-target"],
)  # fmt: skip
def test_malformed_layout_op_between_matmul_and_batchnorm_is_a_channel_mismatch(layout, words):
    # Each crashed (a float axis cannot slice, a NaN target cannot be an int) or, for the float perm, folded.
    r = np.random.default_rng(0)
    inits = [initializer("W", r.normal(size=[5, 4]).astype(np.float32)), *batchnorm_parameters(4, "bn", r)]
    inits.append(initializer("target", np.array([np.nan, 4], np.float32)))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), layout, batchnorm_node("f", "z", "bn")]
    graph = helper.make_graph(nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    [(code, reason)] = skips(model)
    assert code == "channel-mismatch" and words in reason


def test_an_undefined_element_type_is_float32_to_the_batch_dependence_check(tmp_path):
    # UNDEFINED (0) makes float32 random inputs for a protobuf model, but crashed those of an onnx_ir model: bnfold
    # check's batch-dependence measurement (an internal error, exit 2).
    model = onnx.shape_inference.infer_shapes(conv_bn())  # (onnx's checker wants the output's shape)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # (a fixed batch of 1 is not measured)
    path = tmp_path / "undefined.onnx"
    path.write_bytes(model.SerializeToString())
    assert "BD002" in {finding.code for finding in bnfold.check(path)}


def test_a_declared_shape_between_nodes_is_not_taken_on_trust(tmp_path):
    """The file says the MatMul's data is [6, 4]; it is [2, 3, 4], so BatchNorm's channel axis 1 is not the MatMul's
    features: onnx's checker lets the annotation through, and trusting it folded across the wrong axis."""
    import onnx_ir as ir

    r = np.random.default_rng(0)
    inits = [initializer("W", r.normal(size=(4, 3)).astype(np.float32)), *batchnorm_parameters(3, "bn", r)]
    nodes = [helper.make_node("Identity", ["x"], ["t"], name="id"), helper.make_node("MatMul", ["t", "W"], ["h"], name="mm"),
             batchnorm_node("h", "y", "bn")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 3])], inits,
                              value_info=[helper.make_tensor_value_info("t", TensorProto.FLOAT, [6, 4])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "declared.onnx"
    onnx.save(model, path)
    for source in (model, path, ir.from_proto(model)):
        _, report = bnfold.fold_onnx(source, verify=False)
        assert not report.folds and [skip.code for skip in report.skips] == ["channel-mismatch"]


def test_nodes_out_of_order_are_sorted_and_a_cycle_is_refused(tmp_path):
    """onnxruntime's float16 converter with keep_io_types writes the input Cast after the nodes reading it:
    onnxruntime runs that, onnx's checker refused it and bnfold with it. A cycle has no order: still refused."""
    model = conv_bn()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    model.graph.node[0].input[0] = "x16"
    model.graph.node.append(helper.make_node("Identity", ["x"], ["x16"], name="cast_in"))
    path = tmp_path / "unsorted.onnx"
    path.write_bytes(model.SerializeToString())
    loaded = load_inline_model(path)
    assert [node.name for node in loaded.graph.node] == ["cast_in", "conv", "bn"]
    folded, report = bnfold.fold_onnx(path)
    assert len(report.folds) == 1 and report.verification.passed
    model.graph.node[2].input[0] = "z"  # Identity(z) -> Conv -> BatchNorm -> z
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="topologically sorted"):
        load_inline_model(path)


def test_nodes_out_of_order_with_external_data_are_sorted_whatever_the_working_directory(tmp_path):
    """The sorted model was checked in memory, where onnx's checker looks for external data in the working
    directory: refused unless run from the model's folder."""
    model = conv_bn()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    model.graph.node.reverse()
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    folded, report = bnfold.fold_onnx(folder / "m.onnx")
    assert len(report.folds) == 1 and report.verification.passed


def _with_sparse_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (conv_bn's) with the BatchNorm's bias a sparse initializer."""
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    dense = next(tensor for tensor in model.graph.initializer if tensor.name == "bn_bias")
    model.graph.initializer.remove(dense)
    values = helper.make_tensor("bn_bias", TensorProto.FLOAT, [1], [0.5])
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, helper.make_tensor("i", TensorProto.INT64, [1], [1]), [3]))
    return model


def test_sparse_initializers_are_refused_naming_them(tmp_path):
    """onnx_ir reads no sparse initializer: the fold wrote a model reading a value it no longer had (exit 0)."""
    path = tmp_path / "sparse.onnx"
    path.write_bytes(_with_sparse_bias(conv_bn()).SerializeToString())
    with pytest.raises(InputError, match=r"sparse initializers \(bn_bias\) are not supported; store them dense"):
        load_inline_model(path)


def test_sparse_initializers_are_refused_by_the_onnx_ir_loader_and_in_subgraphs_too(tmp_path):
    """A model with external data loads through onnx_ir (as bnfold check and bnfold verify load every model),
    which dropped the sparse initializer without a word; one inside an If branch went unseen by either loader."""
    model = _with_sparse_bias(conv_bn())
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    with pytest.raises(InputError, match=r"m\.onnx: sparse initializers \(bn_bias\) are not supported"):
        bnfold.fold_onnx(folder / "m.onnx")
    with pytest.raises(InputError, match=r"sparse initializers \(bn_bias\) are not supported"):
        load_model(folder / "m.onnx")

    branch = _with_sparse_bias(conv_bn()).graph
    branch.name, branch.input.pop()  # (a branch takes no inputs: it reads x from the graph around it)
    condition = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    nodes = [helper.make_node("Constant", [], ["c"], value=condition), helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch)]
    outer = helper.make_model(
        helper.make_graph(nodes, "outer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    path = tmp_path / "branch.onnx"
    path.write_bytes(outer.SerializeToString())
    for load in (load_inline_model, load_model):
        with pytest.raises(InputError, match=r"sparse initializers \(bn_bias\) are not supported"):
            load(path)


def nested_functions(levels: int) -> onnx.ModelProto:
    """Conv -> BN, then a model-local function F<levels> whose each level calls the one below twice (F0 an Identity):
    2**levels nodes once inlined, from a few dozen stored."""
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    functions = [helper.make_function("local", "F0", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], opsets)]
    for level in range(1, levels + 1):
        twice = [helper.make_node(f"F{level - 1}", ["x"], ["h"], domain="local"), helper.make_node(f"F{level - 1}", ["h"], ["y"], domain="local")]
        functions.append(helper.make_function("local", f"F{level}", ["x"], ["y"], twice, opsets))
    model = conv_bn()
    model.graph.node.append(helper.make_node(f"F{levels}", ["z"], ["z2"], domain="local"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z2", TensorProto.FLOAT, [1, 3, 3, 3]))
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.extend(functions)
    return model


def test_functions_that_multiply_the_nodes_when_inlined_are_refused_before_anything_runs(tmp_path):
    """A 1.8 KB model of 18 such levels (262,144 nodes inlined) held verification for hours in onnxruntime's load,
    deaf to Ctrl-C. Far fewer levels pass."""
    path = tmp_path / "nested.onnx"
    onnx.save(nested_functions(16), path)
    for load in (load_model, load_inline_model):
        with pytest.raises(InputError, match="its model-local functions call each other so that inlining them makes 65538 nodes from the 36 it stores"):
            load(path)
    onnx.save(nested_functions(4), path)
    folded, report = bnfold.fold_onnx(load_inline_model(path))
    assert len(report.folds) == 1 and report.verification.passed
