"""Generated protobuf/gRPC code: RTP-LLM's worker status RPCs (source: ``protos/flexlb_worker.proto``) and flexlb's
gRPC schedule API, package ``flexlb.v1`` (source: ``protos/flexlb_schedule.proto``).

Do not edit the ``*_pb2*.py*`` files by hand: change the .proto and run ``python -m flexlb.proto.generate``.
"""
