"""Cut a rank graph at its `glmc.AllReduce` nodes into segments run one after another.

A backend without a collective op (ONNX Runtime) runs segment 0, all-reduces the
tensors that feed the first AllReduce, feeds the sums to segment 1, and so on.
Every segment is an ordinary ONNX model; its weights stay external, so splitting
copies no weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx.shape_inference
import onnx.utils

from glmc.graphs.ops import ALL_REDUCE, DOMAIN


@dataclass(frozen=True)
class Segment:
    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    # After this segment: (input, output) names of the AllReduce nodes to run.
    all_reduces: list[tuple[str, str]]


def split(model: onnx.ModelProto) -> list[Segment]:
    """Segments of `model` in execution order; one segment when it has no AllReduce."""
    graph = model.graph
    stage_of_value: dict[str, int] = {v.name: 0 for v in graph.input}
    stage_of_value.update({init.name: 0 for init in graph.initializer})
    reduces: list[list[tuple[str, str]]] = []
    node_stage: list[int] = []
    for node in graph.node:  # ONNX nodes are topologically sorted
        stage = max((stage_of_value.get(name, 0) for name in node.input if name), default=0)
        if node.domain == DOMAIN and node.op_type == ALL_REDUCE:
            while len(reduces) <= stage:
                reduces.append([])
            reduces[stage].append((node.input[0], node.output[0]))
            stage_of_value[node.output[0]] = stage + 1
            node_stage.append(-1)
            continue
        for name in node.output:
            stage_of_value[name] = stage
        node_stage.append(stage)
    count = max(node_stage, default=0) + 1
    if count == 1:
        names_in = [v.name for v in graph.input]
        return [Segment(model, names_in, [v.name for v in graph.output], [])]

    graph_outputs = {v.name for v in graph.output}
    produced = [set() for _ in range(count)]
    consumed_later: dict[int, set[str]] = {k: set() for k in range(count)}
    needs = [set() for _ in range(count)]
    for node, stage in zip(graph.node, node_stage):
        if stage < 0:
            continue
        produced[stage].update(node.output)
        needs[stage].update(name for name in node.input if name)
    for stage in range(count):
        for name in needs[stage]:
            for earlier in range(stage):
                if name in produced[earlier]:
                    consumed_later[earlier].add(name)
    segments = []
    initializers = {init.name for init in graph.initializer}
    # The extractor types each segment's inputs and outputs from value_info: infer them
    # for the values that passes created without one (external weights are not read).
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    for stage in range(count):
        reduce_inputs = {i for i, _ in reduces[stage]} if stage < len(reduces) else set()
        outputs = sorted((consumed_later[stage] | reduce_inputs | (graph_outputs & produced[stage])))
        inputs = sorted(name for name in needs[stage] if name not in produced[stage] and name not in initializers)
        sub = extractor.extract_model(inputs, outputs)
        sub.opset_import.extend(o for o in model.opset_import if o.domain not in {x.domain for x in sub.opset_import})
        segments.append(Segment(sub, inputs, outputs, reduces[stage] if stage < len(reduces) else []))
    return segments
