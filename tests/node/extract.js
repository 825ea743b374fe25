#!/usr/bin/env node
// A non-Python client of layertap.v1, driven by tests/test_operations_tools.py.
//
//   node tests/node/extract.js TARGET MODEL IMAGE.jpg NODE
//
// Loads the .proto at run time (@grpc/proto-loader), calls ListModels, then Extract with one
// encoded image, GeM pooling and L2 normalisation, decodes the little-endian float32 tensor and
// prints one JSON line. On a gRPC error it prints {"error_code", "details"} and exits 1.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const PROTO_FILE = path.join(PROTO_ROOT, "layertap", "v1", "layertap.proto");

function fail(err) {
  const code = typeof err.code === "number" ? err.code : -1;
  process.stdout.write(JSON.stringify({ error_code: code, details: err.details || String(err) }) + "\n");
  process.exit(1);
}

function decodeFloat32(tensor) {
  if (tensor.dtype !== "float32") {
    throw new Error(`expected float32, got ${tensor.dtype}`);
  }
  const buf = tensor.data;
  if (buf.length % 4 !== 0) {
    throw new Error(`float32 data of ${buf.length} bytes`);
  }
  const values = new Array(buf.length / 4);
  for (let i = 0; i < values.length; i++) {
    values[i] = buf.readFloatLE(4 * i);
  }
  return values;
}

function main() {
  const [target, model, imagePath, node] = process.argv.slice(2);
  if (!target || !model || !imagePath || !node) {
    process.stderr.write("usage: extract.js TARGET MODEL IMAGE NODE\n");
    process.exit(2);
  }
  const definition = protoLoader.loadSync(PROTO_FILE, {
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_ROOT],
  });
  const proto = grpc.loadPackageDefinition(definition);
  const client = new proto.layertap.v1.FeatureService(target, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    "grpc.max_send_message_length": 64 * 1024 * 1024,
  });
  const deadline = () => new Date(Date.now() + 60000);

  client.ListModels({}, { deadline: deadline() }, (err, listed) => {
    if (err) return fail(err);
    const models = listed.models.map((m) => m.name);
    const request = {
      model,
      images: [{ encoded: fs.readFileSync(imagePath) }],
      nodes: [node],
      output: { pool: "POOLING_GEM", normalize: true },
    };
    client.Extract(request, { deadline: deadline() }, (err2, response) => {
      if (err2) return fail(err2);
      try {
        const out = response.results[0].outputs[0];
        const values = decodeFloat32(out.tensor);
        const norm = Math.sqrt(values.reduce((acc, v) => acc + v * v, 0));
        process.stdout.write(
          JSON.stringify({
            models,
            key: out.key,
            node: out.node,
            shape: out.tensor.shape,
            dtype: out.tensor.dtype,
            norm,
            first: values.slice(0, 5),
          }) + "\n",
        );
        client.close();
      } catch (e) {
        process.stderr.write(`bad response: ${e.stack || e}\n`);
        process.exit(2);
      }
    });
  });
}

main();
