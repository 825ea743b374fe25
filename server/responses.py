"""Domain results -> response messages: model facts, Extract's named tensors and metadata,
Compare's distances. Torch-free: encoded tensors are bytes + dtype + shape already."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from layertap.v1 import layertap_pb2 as pb

from .requests import ExtractJob

if TYPE_CHECKING:
    from .pipeline import Extracted
    from .preprocess import Preprocessing
    from .spec import NodeSpec
    from .worker import ModelStatus


def preprocessing_pb(p: Preprocessing | None) -> pb.Preprocessing:
    """The preprocessing a model applies, as clients see it (empty: none recorded)."""
    if p is None:
        return pb.Preprocessing()
    return pb.Preprocessing(
        resize_size=p.resize_size or 0,
        crop_size=list(p.crop_size),
        mean=list(p.mean),
        std=list(p.std),
        interpolation=p.interpolation,
        antialias=p.antialias,
        resize_kernel=p.resize_kernel,
        resize_mode=p.resize_mode,
    )


def model_info_pb(s: ModelStatus) -> pb.ModelInfo:
    """One model's status and facts, for ListModels and DescribeModel."""
    return pb.ModelInfo(
        name=s.name,
        architecture=s.architecture,
        weights=s.weights,
        weights_sha256=s.weights_sha256,
        input_size=list(s.input_size),
        preprocessing=preprocessing_pb(s.preprocessing),
        device=s.device,
        ready=s.ready,
        status_message=s.message,
        random_weights=s.random_weights,
        compute_dtype=s.compute_dtype,
        prefix_tokens=s.prefix_tokens,
        extraction_mode=s.extraction_mode,
        source=s.source,
    )


def extract_response(
    job: ExtractJob,
    done: Extracted,
    weights_sha256: str,
    preprocessing: Preprocessing | None,
    received: float,
    default_device: str,
) -> pb.ExtractResponse:
    """One named tensor per requested output (or the one concatenation) for each image, and the
    metadata: resolved nodes, preprocessing, stage timings, batch size and serving device."""
    spec, plan, full_nodes, concat_key = job.spec, job.plan, job.nodes, job.concat_key
    infos, images = done.ran.infos, done.ran.images
    node_of = {name: n.name for (_, name), n in zip(plan, job.specs, strict=True)}
    layout_of = {n.name: n.layout for n in job.specs}
    results = []
    for index, row in enumerate(done.rows):
        has_regions = bool(job.regions[index])
        if concat_key:
            out_plan = [(concat_key, "+".join(full_nodes), concat_key)]
        else:
            out_plan = [(key, node_of[name], node_of[name]) for key, name in plan]
        outputs = []
        for out_key, node_field, row_key in out_plan:
            t = row[row_key]
            if spec.pool != "raw":
                layout = "NC"
            elif has_regions:
                layout = "NCHW"  # roi_align bins, whatever the node's layout
            else:
                layout = layout_of[node_field]
            outputs.append(
                pb.NamedTensor(
                    key=out_key,
                    node=node_field,
                    tensor=pb.Tensor(dtype=t.dtype, shape=t.shape, data=t.data, layout=layout),
                )
            )
        results.append(pb.ImageResult(outputs=outputs))
    metadata = pb.ExtractMetadata(
        model=job.model,
        weights_sha256=weights_sha256,
        nodes=[pb.ResolvedNode(key=k, requested=n, node=node_of[n]) for k, n in plan],
        preprocessing=preprocessing_pb(preprocessing),
        timings=pb.Timings(
            queue_ms=1000 * max(i.queue_s for i in infos),
            decode_ms=1000 * sum(p.decode_s for p in images),
            compute_ms=1000 * sum({i.batch_id: i.run_s for i in infos}.values()),
            total_ms=1000 * (time.perf_counter() - received),
        ),
        batch_size=max(i.batch_size for i in infos),
        device=infos[0].device or default_device,  # the one that served
    )
    return pb.ExtractResponse(results=results, metadata=metadata)


def describe_response(
    status: ModelStatus,
    nodes: Sequence[NodeSpec],
    modules: Sequence[tuple[str, str, int]],
    mode: str,
    reason: str,
) -> pb.DescribeModelResponse:
    """A model's catalogue: every extractable node and every module with its own parameters."""
    return pb.DescribeModelResponse(
        model=model_info_pb(status),
        nodes=[
            pb.NodeInfo(
                name=n.name,
                shape=list(n.shape),
                dtype=n.dtype,
                layout=n.layout,
                op=n.op,
                target=n.target,
            )
            for n in nodes
        ],
        modules=[pb.ModuleInfo(name=n, type=t, own_parameters=c) for n, t, c in modules],
        extraction_mode=mode,
        extraction_reason=reason,
    )
