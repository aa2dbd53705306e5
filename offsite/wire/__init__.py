"""Offsite's wire contracts: our gRPC services, Flower records and Flower's Control API.

- ``domain``: the gRPC calls as plain values; ``serde``: the one protobuf <-> domain converter;
  ``clients``: typed stubs; ``servicers``: thin servicers over handlers; ``v1``: generated code.
- ``messages``: the Flower-plane messages (records); ``flower_control``: the SuperLink's Control
  API, typed.

Only this package imports protobuf modules (``tests/test_layering.py``). Nothing is re-exported
here: importing ``offsite.wire.messages`` must not load gRPC, nor ``offsite.wire.serde`` Flower.
"""
