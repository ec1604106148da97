"""Model files that would run code when loaded: `bnfold check` refuses them unless --trust-pickle is given.

Each archive is a genuine torch.export.save (or torch.jit.save) archive with one entry rewritten to
carry a payload that creates a marker file; the marker proves whether the payload ran."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import zipfile

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.onnx_fold.io import InputError


class TouchMarker:
    """Unpickling this creates the marker file: the kind of payload a hostile model file carries."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def conv_bn() -> nn.Module:
    """A Conv-BatchNorm model in eval mode whose statistics look trained (so a clean archive has no finding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model[1].num_batches_tracked.fill_(10)
    return model


@pytest.fixture(scope="module")
def archive_entries() -> dict[str, bytes]:
    """The entries of a .pt2 archive of conv_bn with a dynamic batch (so it holds shape expressions)."""
    exported = torch.export.export(conv_bn(), (torch.zeros(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_archive(path: pathlib.Path, entries: dict[str, bytes]) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def entry(entries: dict[str, bytes], inner_name: str) -> str:
    """The archive name of ``inner_name``: torch puts every entry below a top folder."""
    return next(name for name in entries if name.partition("/")[2] == inner_name)


def torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def payload_in_sample_inputs(entries, marker):
    entries[entry(entries, "data/sample_inputs/model.pt")] = torch_saved(TouchMarker(marker))


def payload_in_pickled_weight(entries, marker):
    config_name = entry(entries, "data/weights/model_weights_config.json")
    config = json.loads(entries[config_name])
    weight = next(iter(config["config"].values()))
    weight["use_pickle"] = True
    entries[config_name] = json.dumps(config).encode()
    entries[entry(entries, "data/weights/" + weight["path_name"])] = torch_saved(TouchMarker(marker))


def payload_in_opaque_constant(entries, marker):
    config_name = entry(entries, "data/constants/model_constants_config.json")
    config = json.loads(entries[config_name])
    config["config"]["payload"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    entries[config_name] = json.dumps(config).encode()
    entries[config_name.replace("model_constants_config.json", "opaque_obj_0")] = pickle.dumps(TouchMarker(marker))


def payload_in_shape_expression(entries, marker):
    """sympify evaluates the archive's shape expressions as Python: one of them touches the marker, then
    evaluates to the batch symbol it replaced."""
    model_name = entry(entries, "models/model.json")
    text = entries[model_name].decode()
    symbol = json.dumps("Symbol('s31', positive=True, integer=True)")
    assert symbol in text, "the exported batch dimension is no longer named s31"
    payload = f"(__import__('pathlib').Path({str(marker)!r}).touch(), {json.loads(symbol)})[1]"
    entries[model_name] = text.replace(symbol, json.dumps(payload), 1).encode()


PAYLOADS = [payload_in_sample_inputs, payload_in_pickled_weight, payload_in_opaque_constant, payload_in_shape_expression]


def invoke(*args):
    return CliRunner().invoke(main, ["check", *map(str, args)], catch_exceptions=False)


@pytest.fixture(params=PAYLOADS, ids=lambda plant: plant.__name__)
def hostile_archive(request, archive_entries, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A .pt2 archive with a payload in one entry, and the marker file the payload would create."""
    marker = tmp_path / "payload-ran"
    entries = dict(archive_entries)
    request.param(entries, marker)
    return write_archive(tmp_path / "hostile.pt2", entries), marker


def test_hostile_archive_is_refused_by_the_cli_without_running_its_payload(hostile_archive):
    path, marker = hostile_archive
    result = invoke(path)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
    assert "runs code from the file, so it is refused; pass --trust-pickle" in result.stderr
    assert not marker.exists()


def test_hostile_archive_is_an_input_error_from_python_without_running_its_payload(hostile_archive):
    path, marker = hostile_archive
    with pytest.raises(InputError, match="--trust-pickle"):
        bnfold.check(path)
    assert not marker.exists()


def test_with_trust_pickle_the_payload_runs_as_torch_runs_it(hostile_archive):
    path, marker = hostile_archive
    invoke("--trust-pickle", path)
    assert marker.exists()


def test_clean_archive_checks_without_trust_pickle(archive_entries, tmp_path):
    path = write_archive(tmp_path / "clean.pt2", archive_entries)
    result = invoke("--format", "json", path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["findings"] == []  # loaded with its example inputs and measured (no BD002)
    assert bnfold.check(path) == []


def test_archive_with_aotinductor_code_is_refused(archive_entries, tmp_path):
    """torch.export.load loads every AOTInductor model of the archive: a native library, run on loading."""
    entries = dict(archive_entries)
    top_folder = next(iter(entries)).partition("/")[0]
    entries[f"{top_folder}/data/aotinductor/model/model.so"] = b"\x7fELF"
    result = invoke(write_archive(tmp_path / "aoti.pt2", entries))
    assert result.exit_code == 2
    assert "holding AOTInductor compiled code: loading or running it runs code from the file" in result.stderr


@pytest.mark.parametrize("pickle_entry", ["data.pkl", "constants.pkl"])
def test_torchscript_unpickler_resolves_no_python_global(pickle_entry, tmp_path):
    """torch.jit.load's C++ unpickler knows only TorchScript types: a payload fails to load, without running."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(conv_bn()), buffer)
    with zipfile.ZipFile(buffer) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    marker = tmp_path / "payload-ran"
    entries[entry(entries, pickle_entry)] = pickle.dumps(TouchMarker(marker), protocol=2)
    result = invoke("--trust-pickle", "--input-shape", "1,3,8,8", write_archive(tmp_path / "model.ts", entries))
    assert result.exit_code == 2
    assert "not a readable torchscript archive" in result.stderr
    assert not marker.exists()


class _WritesAFileAsItLoads(torch.nn.Module):
    """TorchScript that writes a file while torch.jit.load loads it: aten::from_file creates the file, mapped shared,
    in __setstate__."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.read = 0

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        written = torch.from_file(state[0], True, 4, dtype=torch.uint8)
        written.fill_(88)
        self.read = int(written.sum().item())  # (used: TorchScript would drop an unread tensor's writes)
        self.target, self.training = state

    def forward(self, x):
        return x


def test_torchscript_archives_are_refused_unless_trusted(tmp_path):
    """TorchScript's code runs as the archive loads: it was loaded as safe, and wrote any file."""
    target = tmp_path / "outside" / "written"
    target.parent.mkdir()
    model = torch.nn.Sequential(_WritesAFileAsItLoads(str(target)), conv_bn())
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model.eval()), path)
    assert not target.exists()  # (saving runs __getstate__ only)
    result = invoke(path)
    assert result.exit_code == 2
    assert "is a TorchScript archive: its code runs as it loads and runs" in result.stderr
    assert "--trust-pickle" in result.stderr
    assert not target.exists()
    assert invoke("--trust-pickle", path).exit_code in (0, 1) and target.read_bytes() == b"XXXX"  # (the payload is real)


@pytest.fixture
def exportable_from_file():
    """aten::from_file with a Meta kernel, which torch.export needs to trace it (an attacker's own process has one)."""
    library = torch.library.Library("aten", "IMPL")

    def empty_of_size(filename, shared=None, size=0, *, dtype=None, layout=None, device=None, pin_memory=None):
        return torch.empty(size, dtype=dtype, device="meta")

    library.impl("from_file", empty_of_size, "Meta")
    yield
    library._destroy()


def test_export_archive_calling_a_file_operator_is_refused(tmp_path, exportable_from_file):
    """A .pt2 program is read safely, and check runs it: aten::from_file in its graph wrote the file it names."""
    target = tmp_path / "outside" / "canary"
    target.parent.mkdir()
    target.write_bytes(b"kept")

    class MapsAFile(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = conv_bn()

        def forward(self, x):
            written = torch.from_file(str(target), True, 4, dtype=torch.uint8)
            written.fill_(90)
            return self.layers(x) + written.float().sum() * 0

    program = torch.export.export(MapsAFile().eval(), (torch.randn(1, 3, 8, 8),))
    target.write_bytes(b"kept")  # (export traced with real tensors)
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    result = invoke(path)
    assert result.exit_code == 2
    assert "holding a call of aten::from_file, which opens a file by name" in result.stderr
    assert target.read_bytes() == b"kept"


class _RunsAShellCommand:
    def __reduce__(self):
        import os

        return os.system, ("true",)


def test_a_state_dict_carrying_a_payload_names_what_it_needs(tmp_path):
    """torch blocks a global of a dangerous module (os, subprocess) in other words than an unknown class: the
    refusal still names it and the option."""
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2), "extra": _RunsAShellCommand()}, path)
    result = invoke(path)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "(it needs posix.system)" in result.stderr and "pass --trust-pickle if you trust the file" in result.stderr


def test_an_archive_entry_that_expands_far_past_its_size_is_refused_unread(tmp_path):
    """torch stores its entries uncompressed; a deflated entry of zeros took 3 GB and 14 s to load from a 3 MB file."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        entries = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            if name.endswith("/data/0"):
                archive.writestr(name, bytes(32 << 20), compress_type=zipfile.ZIP_DEFLATED)  # 32 MiB of zeros
            else:
                archive.writestr(name, data)
    assert path.stat().st_size < 100_000
    result = invoke(path)
    assert result.exit_code == 2
    assert f"archive entry '{next(name for name in entries if name.endswith('/data/0'))}' expands to 33554432 bytes" in result.stderr
    assert "refused as a decompression bomb" in result.stderr
    # An archive as torch writes it (stored) passes this check, however large.
    torch.save({"w": torch.zeros(1 << 20)}, path)
    assert "decompression bomb" not in invoke(path).stderr


def test_export_archive_calling_an_operator_through_a_higher_order_one_is_refused(tmp_path):
    """with_effects(token, aten.from_file, path, ...) calls the operator its argument names: the check of node
    targets let it through, and check wrote the file."""
    target = tmp_path / "outside" / "canary"
    target.parent.mkdir()
    target.write_bytes(b"kept")
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(conv_bn(), (torch.randn(2, 3, 8, 8),)), path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    program = json.loads(entries[entry(entries, "models/model.json")])
    graph = program["graph_module"]["graph"]
    byte = {"dtype": 1, "sizes": [{"as_int": 4}], "requires_grad": False, "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}  # fmt: skip
    graph["tensor_values"].update({name: dict(byte) for name in ("token", "mapped", "filled")})

    def argument(name, kind=1, **value):
        return {"name": name, "arg": value, "kind": kind}

    graph["nodes"][0:0] = [
        {"target": "torch.ops.higher_order.with_effects", "name": "effect", "metadata": {}, "is_hop_single_tensor_return": True,
         "inputs": [argument("", as_tensor=graph["inputs"][-1]["as_tensor"]), argument("", as_operator="torch.ops.aten.from_file.default"),
                    argument("", as_string=str(target)), argument("", as_bool=True), argument("", as_int=4),
                    argument("dtype", 2, as_scalar_type=1)],
         "outputs": [{"as_tensors": [{"name": "token"}, {"name": "mapped"}]}]},
        {"target": "torch.ops.aten.fill_.Scalar", "name": "filled", "metadata": {}, "is_hop_single_tensor_return": None,
         "inputs": [argument("self", as_tensor={"name": "mapped"}), argument("value", as_int=90)],
         "outputs": [{"as_tensor": {"name": "filled"}}]},
    ]  # fmt: skip
    entries[entry(entries, "models/model.json")] = json.dumps(program).encode()
    result = invoke(write_archive(tmp_path / "effects.pt2", entries))
    assert result.exit_code == 2
    assert "holding a call of with_effects, which is not an operator bnfold runs from an untrusted file" in result.stderr
    assert target.read_bytes() == b"kept"


def test_an_archive_torch_cannot_read_is_one_line_naming_why(tmp_path, archive_entries):
    """torch.export.load logs the reader's traceback (28 lines on stderr), then raises an error saying to look at it."""
    entries = dict(archive_entries)
    program = entry(entries, "models/model.json")
    entries[program] = entries[program].replace(b"torch.ops.aten.conv2d.default", b"torch.ops.higher_order.with_effects")
    result = invoke(write_archive(tmp_path / "damaged.pt2", entries))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "not a readable export archive (RuntimeError: " in line and "warnings above" not in line
