"""The naive per-request gRPC server that bench/compare.py measures layertap against.

What people write today to serve a layer's descriptor: a `grpc.server` on a ThreadPoolExecutor,
PIL decoding and torchvision transforms per request, one forward per request (batch 1) with a
`register_forward_hook` on the named module, GeM pooling, float32 bytes back. No batching, no
decode pool, no truncation of the graph (the whole model runs; the hook only captures).

It speaks layertap's own `layertap.v1.FeatureService/Extract` message shapes (only that RPC,
only what the benchmark sends: encoded images, one node, GeM pooling), so that the benchmark
drives it with exactly the same client code as layertap and client cost is identical.

Run from the repository root: `.venv/bin/python -m bench.naive_server --arch resnet50 --node
layer4 --port 50070`.
"""

from __future__ import annotations

import argparse
import io
import logging
import signal
import threading
from concurrent import futures

import grpc
import torch
from PIL import Image
from torchvision import transforms as T

from bench.pipeline import load_model
from layertap.v1 import layertap_pb2 as pb
from layertap.v1 import layertap_pb2_grpc as pb_grpc

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NaiveService(pb_grpc.FeatureServiceServicer):
    def __init__(self, model: torch.nn.Module, node: str, device: str, gem_p: float = 3.0):
        self.model = model
        self.node = node
        self.device = device
        self.gem_p = gem_p
        self.transform = T.Compose(
            [
                T.Resize(256),
                T.CenterCrop(224),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        # one hook, registered once; each request thread reads back its own capture
        self._local = threading.local()
        model.get_submodule(node).register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        self._local.out = output

    def Extract(self, request: pb.ExtractRequest, context: grpc.ServicerContext) -> object:
        results = []
        key = request.nodes[0] if request.nodes else self.node
        for image in request.images:
            pil = Image.open(io.BytesIO(image.encoded)).convert("RGB")
            x = self.transform(pil).unsqueeze(0).to(self.device)
            with torch.no_grad():
                self.model(x)
                feat = self._local.out
                p = self.gem_p
                desc = feat.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)[0]
            data = desc.float().cpu().numpy().tobytes()
            tensor = pb.Tensor(dtype="float32", shape=[desc.shape[0]], data=data, layout="NC")
            named = pb.NamedTensor(key=key, node=self.node, tensor=tensor)
            results.append(pb.ImageResult(outputs=[named]))
        return pb.ExtractResponse(
            results=results, metadata=pb.ExtractMetadata(model=request.model, device=self.device)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--weights", default="none", help="torchvision weights name, or none")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=8, help="ThreadPoolExecutor max_workers")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = load_model(args.arch, args.weights, args.device)
    service = NaiveService(model, args.node, args.device)
    with torch.no_grad():  # one warm-up forward, like any server would do
        model(torch.zeros(1, 3, 224, 224, device=args.device))
    limit = 64 * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.threads),
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ],
    )
    pb_grpc.add_FeatureServiceServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"naive server ready on 127.0.0.1:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(1).wait()


if __name__ == "__main__":
    main()
