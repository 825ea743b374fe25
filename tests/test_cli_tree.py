"""`layertap nodes MODEL --tree`: modules as an indented tree with graph nodes' shapes."""

from __future__ import annotations

import pytest
from conftest import RunningServer

from layertap.client import (
    FeatureClient,
    ModelDescription,
    ModelInfo,
    ModuleInfo,
    NodeInfo,
    Preprocessing,
)
from layertap.client.cli import main
from layertap.client.cli.nodes import tree_rows


def _description() -> ModelDescription:
    prep = Preprocessing(0, (32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear", True)
    info = ModelInfo("net", "net", "none", "random", (32, 32), prep, "cpu", True, "", True, "")
    modules = [
        ModuleInfo("", "Net", 0),
        ModuleInfo("stem", "Conv2d", 10),
        ModuleInfo("block", "Sequential", 0),
        ModuleInfo("block.0", "Block", 0),
        ModuleInfo("block.0.relu", "ReLU", 0),  # registered before conv, runs after it
        ModuleInfo("block.0.conv", "Conv2d", 20),
        ModuleInfo("unused", "Dropout", 0),
        ModuleInfo("head", "Linear", 30),
    ]

    def node(name: str, shape: tuple[int, ...], op: str, target: str) -> NodeInfo:
        return NodeInfo(name, shape, "float32", "NCHW" if len(shape) == 4 else "NC", op, target)

    nodes = [
        node("stem", (1, 8, 16, 16), "call_module", "Conv2d"),
        node("block.0.conv", (1, 8, 16, 16), "call_module", "Conv2d"),
        node("block.0.relu", (1, 8, 16, 16), "call_module", "ReLU"),
        node("block.0.add", (1, 8, 16, 16), "call_function", "add"),
        node("block.0.relu_1", (1, 8, 16, 16), "call_module", "ReLU"),
        node("flatten", (1, 2048), "call_function", "flatten"),
        node("head", (1, 10), "call_module", "Linear"),
    ]
    return ModelDescription(info, nodes, modules, "fx")


def test_tree_rows_nest_modules_and_functions_in_execution_order() -> None:
    rows = tree_rows(_description())
    assert rows == [
        ["(model)", "Net", "", ""],
        ["  stem", "Conv2d", "[1, 8, 16, 16]", "NCHW"],
        ["  block", "Sequential", "[1, 8, 16, 16]", "NCHW"],  # what --node block resolves to
        ["    block.0", "Block", "[1, 8, 16, 16]", "NCHW"],
        ["      block.0.conv", "Conv2d", "[1, 8, 16, 16]", "NCHW"],
        ["      block.0.relu", "ReLU", "[1, 8, 16, 16]", "NCHW"],
        ["      block.0.add", "add()", "[1, 8, 16, 16]", "NCHW"],
        ["      block.0.relu_1", "ReLU", "[1, 8, 16, 16]", "NCHW"],
        ["  unused", "Dropout", "", ""],  # never runs: stays after its registered neighbour
        ["  flatten", "flatten()", "[1, 2048]", "NC"],
        ["  head", "Linear", "[1, 10]", "NC"],
    ]
    assert [r[0].strip() for r in tree_rows(_description(), substring="add")] == [
        "(model)",
        "block",
        "block.0",
        "block.0.add",
    ]
    assert [r[0].strip() for r in tree_rows(_description(), max_depth=1)] == [
        "(model)",
        "stem",
        "block",
        "unused",
        "flatten",
        "head",
    ]


def _tree(server: RunningServer, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main(["--target", server.target, "nodes", *args, "--tree"]) == 0
    return capsys.readouterr().out.splitlines()


def _row(lines: list[str], name: str) -> tuple[int, list[str]]:
    """(indent, columns) of the line for ``name``."""
    for line in lines:
        if line.split() and line.split()[0] == name:
            return len(line) - len(line.lstrip()), line.split()
    raise AssertionError(f"{name} not in the tree:\n" + "\n".join(lines))


def test_nodes_tree_on_a_real_model(
    small_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _tree(small_server, capsys, "mobilenet_v2")
    assert lines[0].split() == ["MODULE", "TYPE", "OUTPUT", "SHAPE", "LAYOUT"]
    indent_18, cols = _row(lines, "features.18")
    assert cols[1:] == ["Conv2dNormActivation", "[1,", "1280,", "7,", "7]", "NCHW"]
    # Conv2dNormActivation is one leaf of the traced graph: its parts are modules, not nodes
    indent_conv, cols = _row(lines, "features.18.0")
    assert cols[1:] == ["Conv2d"]
    assert indent_conv > indent_18 > _row(lines, "features")[0]
    _, cols = _row(lines, "features.3.conv.2")
    assert cols[1:] == ["Conv2d", "[1,", "24,", "56,", "56]", "NCHW"]
    indent_add, cols = _row(lines, "features.3.add")
    assert cols[1:] == ["add()", "[1,", "24,", "56,", "56]", "NCHW"]
    assert indent_add == _row(lines, "features.3.conv")[0]
    # functions of the forward sit under their module: here the model itself
    indent_flat, cols = _row(lines, "flatten")
    assert cols[1:] == ["flatten()", "[1,", "1280]", "NC"]
    assert indent_flat == _row(lines, "classifier")[0]
    assert _row(lines, "classifier.1")[1][1:] == ["Linear", "[1,", "1000]", "NC"]
    names = [line.split()[0] for line in lines[1:]]
    assert names.index("features.17") < names.index("features.18") < names.index("flatten")
    # every graph node of the model is in the tree, and `nodes` without --tree lists exactly
    # the graph nodes, one a line, in execution order
    with FeatureClient(small_server.target) as client:
        graph = [n.name for n in client.describe("mobilenet_v2").nodes]
    assert len(graph) > 80 and {"features.3.add", "features.18", "flatten"} <= set(graph)
    assert main(["--target", small_server.target, "nodes", "mobilenet_v2"]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert plain == graph
    assert {"features.3.add", "features.18", "flatten", "classifier.1"} <= set(plain)
    assert set(plain) <= set(names)
    assert main(["--target", small_server.target, "nodes", "mobilenet_v2", "--filter", ".add"]) == 0
    assert capsys.readouterr().out.splitlines() == [n for n in graph if ".add" in n] != []


def test_nodes_tree_functions_inside_blocks_and_filter(
    small_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _tree(small_server, capsys, "resnet18")
    indent_block, _ = _row(lines, "layer1.0")
    indent_add, cols = _row(lines, "layer1.0.add")
    assert indent_add > indent_block and cols[1] == "add()"
    assert _row(lines, "layer1.0.relu_1")[0] == indent_add
    names = [line.split()[0] for line in lines[1:]]
    # in execution order: conv2, bn2, add, second relu
    order = ["layer1.0.conv2", "layer1.0.bn2", "layer1.0.add", "layer1.0.relu_1", "layer1.1"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)

    lines = _tree(small_server, capsys, "resnet18", "--filter", "layer4.1.add")
    assert [line.split()[0] for line in lines[1:]] == [
        "(model)",
        "layer4",
        "layer4.1",
        "layer4.1.add",
    ]
    lines = _tree(small_server, capsys, "resnet18", "--depth", "1")
    assert "layer1.0" not in {line.split()[0] for line in lines}
    assert _row(lines, "layer4")[1][1:] == ["Sequential", "[1,", "512,", "7,", "7]", "NCHW"]
