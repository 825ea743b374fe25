"""The same model and descriptor served by LitServe, for bench/compare.py.

LitServe's dynamic batching is on (`max_batch_size`, `batch_timeout`, both flags so the
benchmark can sweep them). Requests are JSON `{"image": "<base64 JPEG>"}`; the answer is
`{"descriptor": "<base64 little-endian float32>"}` (raw bytes, like layertap and the naive
server, instead of a JSON list of floats that would cost LitServe extra encoding time).
Decoding and preprocessing are the same tensor ops as the in-process baseline (torchvision's
JPEG decoder, antialiased resize on uint8, centre crop, normalise); the graph is truncated at
the node with torchvision's `create_feature_extractor`, GeM-pooled on the batch.

Run from the repository root: `.venv/bin/python -m bench.litserve_app --arch resnet50 --node
layer4 --port 8010 --max-batch-size 8 --batch-timeout 0.005`; `GET /health` answers `ok` once the
model is ready.
"""

from __future__ import annotations

import argparse
import base64

import litserve as ls
import torch

from bench.pipeline import feature_extractor, gem, load_model, preprocess_jpeg


class DescriptorAPI(ls.LitAPI):
    def __init__(self, arch: str, node: str, weights: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # max_batch_size, batch_timeout
        self.arch, self.node, self.weights = arch, node, weights

    def setup(self, device: str) -> None:
        self.device = device
        model = load_model(self.arch, self.weights, device)
        self.extractor = feature_extractor(model, self.node)
        with torch.inference_mode():
            self.extractor(torch.zeros(1, 3, 224, 224, device=device))

    def decode_request(self, request: dict) -> torch.Tensor:
        return preprocess_jpeg(base64.b64decode(request["image"]))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return gem(self.extractor(x.to(self.device))["feat"]).float().cpu()

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict:
        return {"descriptor": base64.b64encode(output.numpy().tobytes()).decode("ascii")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    api = DescriptorAPI(
        args.arch,
        args.node,
        args.weights,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(
        api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=120
    )
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
