"""Generated gRPC modules of the ringserve.v1 API (see ringserve.proto)."""
