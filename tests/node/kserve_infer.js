#!/usr/bin/env node
// A non-Python client of the KServe v2 / Open Inference Protocol over gRPC, built from the
// protocol's PUBLISHED .proto (kserve's grpc_predict_v2.proto, fetched from PyPI by
// tests/test_kserve_node.py), never layertap's own copy.
//
//   node tests/node/kserve_infer.js PROTO TARGET MODEL IMAGE.jpg OUTPUT
//
// Calls ServerLive, ServerReady, ModelMetadata, then ModelInfer with the image as a BYTES
// tensor of shape [1] in raw_input_contents (a 4-byte little-endian length, then the bytes)
// and the request parameters pool = "gem" (string_param) and normalize = true (bool_param).
// Decodes the FP32 raw_output_contents and prints one JSON line, the float32 bytes in base64.
// On a gRPC error it prints {"error_code", "details"} and exits 1.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function fail(err) {
  const code = typeof err.code === "number" ? err.code : -1;
  process.stdout.write(JSON.stringify({ error_code: code, details: err.details || String(err) }) + "\n");
  process.exit(1);
}

// One BYTES tensor of one element in the protocol's raw form.
function rawBytesTensor(data) {
  const length = Buffer.alloc(4);
  length.writeUInt32LE(data.length, 0);
  return Buffer.concat([length, data]);
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 60000);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const [protoFile, target, model, imagePath, output] = process.argv.slice(2);
  if (!protoFile || !target || !model || !imagePath || !output) {
    process.stderr.write("usage: kserve_infer.js PROTO TARGET MODEL IMAGE OUTPUT\n");
    process.exit(2);
  }
  // field names as in the .proto; the protocol's parameters are a oneof set by its member
  const options = { keepCase: true, longs: Number, defaults: true, includeDirs: [path.dirname(protoFile)] };
  const definition = protoLoader.loadSync(protoFile, options);
  const proto = grpc.loadPackageDefinition(definition);
  const client = new proto.inference.GRPCInferenceService(target, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.max_send_message_length": 64 * 1024 * 1024,
  });
  try {
    const live = await call(client, "ServerLive", {});
    const ready = await call(client, "ServerReady", {});
    const meta = await call(client, "ModelMetadata", { name: model, version: "" });
    const request = {
      model_name: model,
      model_version: "",
      id: "node-kserve",
      parameters: {
        pool: { string_param: "gem" },
        normalize: { bool_param: true },
      },
      inputs: [{ name: "images", datatype: "BYTES", shape: [1] }],
      outputs: [{ name: output }],
      raw_input_contents: [rawBytesTensor(fs.readFileSync(imagePath))],
    };
    const response = await call(client, "ModelInfer", request);
    const out = response.outputs[0];
    const raw = response.raw_output_contents[0];
    if (out.datatype !== "FP32" || raw.length % 4 !== 0) {
      throw new Error(`expected FP32, got ${out.datatype} with ${raw.length} bytes`);
    }
    const values = [];
    for (let i = 0; i < raw.length / 4; i++) {
      values.push(raw.readFloatLE(4 * i));
    }
    process.stdout.write(
      JSON.stringify({
        live: live.live,
        ready: ready.ready,
        inputs: meta.inputs.map((i) => [i.name, i.datatype, i.shape]),
        outputs: meta.outputs.length,
        id: response.id,
        model_name: response.model_name,
        name: out.name,
        datatype: out.datatype,
        shape: out.shape,
        norm: Math.sqrt(values.reduce((acc, v) => acc + v * v, 0)),
        raw_b64: raw.toString("base64"),
      }) + "\n",
    );
    client.close();
  } catch (err) {
    if (typeof err.code === "number") return fail(err);
    process.stderr.write(`bad response: ${err.stack || err}\n`);
    process.exit(2);
  }
}

main();
