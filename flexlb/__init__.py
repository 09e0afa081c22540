"""flexlb: a load balancer and scheduler for LLM-inference fleets."""

import os

# gRPC's fork handlers, on by default in grpcio's core, restart its poller in a forked child; a child that
# subprocess.Popen made has had its descriptors closed by then (close_fds), and the poller aborts it with "epoll_wait
# error: Bad file descriptor" before it can exec (grpc/grpc#43157): seen as a `flexlb master` started by a test
# dying with SIGABRT. flexlb forks only to exec, so the handlers are not needed. Set before anything imports grpc;
# an explicit setting in the environment wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
