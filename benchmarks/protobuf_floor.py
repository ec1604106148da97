"""How much of a Python fold's time protobuf access alone takes, on a Conv→BN chain.

    .venv/bin/python benchmarks/protobuf_floor.py [PAIRS]

Times, with no arithmetic and no bookkeeping, the reads and writes any fold of ``conv_bn_chain(PAIRS)``
on the ``onnx.ModelProto`` must make through protobuf's Python objects (every node's op type, inputs,
outputs and attributes; every initializer's name, type, shape and bytes; the output's nodes and
initializers), next to ``onnx.load`` + ``onnx.save`` of the same model and bnfold's ``fold_onnx``. Prints
medians of 7 runs in ms and per pair. This is the floor behind the chains' row in benchmarks/README.md.
"""

from __future__ import annotations

import collections
import gc
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx

from bnfold import fold_onnx
from bnfold.testing import conv_bn_chain


def reads(model: onnx.ModelProto) -> None:
    nodes = list(model.graph.node)
    [node.op_type for node in nodes]
    [node.domain for node in nodes]
    inputs = [list(node.input) for node in nodes]
    outputs = [list(node.output) for node in nodes]
    collections.Counter(itertools.chain.from_iterable(inputs))
    {name: position for position, names in enumerate(outputs) for name in names}
    [[(attribute.name, attribute.type) for attribute in node.attribute] for node in nodes]
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    [(tensor.data_type, tensor.data_location, tuple(tensor.dims), tensor.raw_data) for tensor in tensors.values()]


def writes(model: onnx.ModelProto) -> None:
    """The folded copy's shape of work: all nodes, the weights kept, two new tensors and two input edits per pair."""
    folded = onnx.ModelProto()
    folded.graph.node.extend(model.graph.node)
    folded.graph.initializer.extend(t for t in model.graph.initializer if not t.name.startswith(("bn", "w")))
    for conv in folded.graph.node[::2]:
        for suffix in ("", "_bias"):
            tensor = folded.graph.initializer.add()
            tensor.name, tensor.data_type = conv.input[1] + suffix, onnx.TensorProto.FLOAT
            tensor.dims.extend((4, 4, 1, 1))
            tensor.raw_data = bytes(64)
        conv.input[1] = conv.input[1] + "_bnfold"
        conv.input.append(conv.input[1] + "_bias")


def median_ms(run) -> float:
    times = []
    for _ in range(7):
        gc.collect()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    model = conv_bn_chain(pairs)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "chain.onnx"
        onnx.save(model, path)
        figures = {
            "onnx.load + onnx.save": median_ms(lambda: onnx.save(onnx.load(path), Path(scratch) / "copy.onnx")),
            "protobuf reads a fold needs": median_ms(lambda: reads(model)),
            "protobuf writes a fold needs": median_ms(lambda: writes(model)),
            "bnfold.fold_onnx(verify=False)": median_ms(lambda: fold_onnx(model, verify=False)),
        }
    print(f"chain of {pairs} Conv->BN pairs")
    for label, ms in figures.items():
        print(f"  {label:<32} {ms:8.1f} ms  {1000 * ms / pairs:6.1f} us/pair")


if __name__ == "__main__":
    main()
