"""Generated protobuf/gRPC stubs for layertap.v1 (regenerate with `make proto`; never edit)."""
