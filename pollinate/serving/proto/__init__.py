"""Generated protobuf/gRPC modules of kserve_v2.proto (regenerate with scripts/gen-proto)."""
