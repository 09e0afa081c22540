"""flexlb's gRPC schedule API (``flexlb.v1.FlexlbScheduler``, protos/flexlb_schedule.proto): the HTTP schedule API's
Schedule and Release for frontends that prefer gRPC, served by a router when ``enableGrpcPrefillMaster`` is set.

``convert`` maps messages to and from the HTTP API's JSON shapes (pure), ``service`` answers the RPCs through the
router's RequestQueue and Scheduler, ``server`` runs the gRPC server in the router's lifecycle.
"""

from flexlb.grpc_api.server import GrpcPortUnavailable, GrpcScheduleApi
from flexlb.grpc_api.service import ScheduleService

__all__ = ["GrpcPortUnavailable", "GrpcScheduleApi", "ScheduleService"]
