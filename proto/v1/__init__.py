"""splitserve.v1: the gRPC API (generated stubs; regenerate with `python -m splitserve.proto.generate`)."""
