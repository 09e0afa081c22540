"""Generated protobuf/gRPC code for RTP-LLM's worker status RPCs (source: ``protos/flexlb_worker.proto``).

Do not edit ``flexlb_worker_pb2*.py*`` by hand: change the .proto and run ``python -m flexlb.proto.generate``.
"""
