"""Offsite's wire contract: protobuf/gRPC code generated from proto/offsite/v1 (see generate)."""
