"""`flexlb launch`: the command line. Everything is checked before anything starts (GPUs, ports, the template, where
to register): a mistake is one message and exit status 2, with no process started."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from flexlb.bench.argtypes import int_at_least, positive_float
from flexlb.cli_options import port
from flexlb.domain import Role
from flexlb.embedded_redis import free_port
from flexlb.launch.plan import ENGINES, GPUS_ENV, PLACEHOLDERS, PlanError, build_plan, ports_in_use
from flexlb.launch.run import Launcher, Serve, Target
from flexlb.settings import Settings
from flexlb.stack.processes import STOP_GRACE_S
from flexlb.state.redis_url import RedisUrlError, parse_redis_url

DESCRIPTION = """Start COUNT engine processes on consecutive ports from BASE_PORT, each on its own TENSOR_PARALLEL_SIZE
GPUs (CUDA_VISIBLE_DEVICES), wait until each answers its health path, register each as a worker of ROLE with its
engine kind, restart one that dies (deregistered meanwhile; backoff 1 s doubling to 30 s), and stop them all on
Ctrl-C / SIGTERM. Words after `--` go to the end of every engine's command line."""

EPILOG = (
    "commands: vllm: `vllm serve MODEL --host H --port P --tensor-parallel-size T ...`; sglang: `python -m"
    " sglang.launch_server --model-path MODEL --host H --port P --tp T ...`; sim: `flexlb sim-worker --role R --host H"
    " --port P --model MODEL --engine DIALECT ...` (DIALECT from --worker-engine: sim/rtp_llm, vllm or sglang); cmd:"
    " --cmd, split as a shell splits it (no shell runs it), with these placeholders: "
    + "; ".join(f"{{{name}}} {what}" for name, what in PLACEHOLDERS.items())
    + ". --kv-events-port adds to vllm and sglang: --kv-events-config"
    """ '{"publisher": "zmq", "endpoint": "tcp://H:PORT", "replay_endpoint": "tcp://H:PORT+1"}' (vllm also"""
    ' "enable_kv_cache_events": true); to sim: --kv-events-port PORT.'
    " Registration: in the Redis of --serve, REDIS_URL or --redis-url (as `flexlb worker add`), or through --router"
    " URL's admin API (POST /rtp_llm/workers, with FLEXLB_ADMIN_TOKEN). See docs/real-engines.md."
)


def _role(text: str) -> Role:
    try:
        return Role.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_launch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="start N engines (vllm, sglang, sim or a command), register them, restart dead ones; Ctrl-C stops them",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("--engine", choices=ENGINES, required=True, help="what to start")
    p.add_argument("--model", help="the model (vllm, sglang: required; sim: its served name, default flexlb-sim)")
    p.add_argument("--count", type=int_at_least(1), default=1, help="engines to start (default 1)")
    p.add_argument(
        "--base-port",
        type=int_at_least(1),
        default=8000,
        help="engine i listens on BASE_PORT + i (+ 2 x i for an engine with a status gRPC port, the simulator's"
        " default; default 8000)",
    )
    p.add_argument(
        "--tensor-parallel-size", "--tp", type=int_at_least(1), default=1, help="GPUs per engine (default 1)"
    )
    p.add_argument(
        "--role", type=_role, default=Role.PDFUSION, help="pdfusion (default), prefill or decode: registered as"
    )
    p.add_argument("--host", default="127.0.0.1", help="the engines' listen address (default 127.0.0.1)")
    p.add_argument(
        "--advertise-host", help="the address registered and health-checked (default: --host; this host's for 0.0.0.0)"
    )
    p.add_argument(
        "--gpus",
        help=f"the GPUs to hand out, e.g. 0,1,2,3 (default: {GPUS_ENV}, else nvidia-smi -L; sim: none unless given)",
    )
    p.add_argument("--cmd", dest="template", metavar="TEMPLATE", help="--engine cmd: the command template")
    p.add_argument(
        "--worker-engine",
        help="registered engine kind, i.e. how the master polls it: rtp_llm, sim (status gRPC on port + 1), vllm"
        " or sglang (their /metrics); default: the engine's own (cmd: vllm). With --engine sim, vllm or sglang run"
        " the simulator in that dialect",
    )
    p.add_argument(
        "--kv-events-port",
        type=port,
        metavar="PORT",
        help="engine i publishes KV events on PORT + 2 x i, its replay socket on the port after (vllm, sglang: an"
        " added --kv-events-config; sim: with --worker-engine vllm or sglang; cmd: {kv_events_port}), registered"
        " with the worker so the master subscribes (default: no events)",
    )
    p.add_argument("--health-path", default="/health", help="polled until it answers 200 (default /health)")
    p.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=600.0,
        help="seconds an engine has to become healthy (default 600: loading a large model takes minutes)",
    )
    p.add_argument(
        "--stop-grace",
        type=positive_float,
        default=STOP_GRACE_S,
        help=f"seconds between SIGTERM and SIGKILL at the stop (default {STOP_GRACE_S:g})",
    )
    p.add_argument("--log-dir", help="the engines' logs (default: a new flexlb-launch-* directory, kept)")
    reg = p.add_argument_group("registration")
    reg.add_argument("--redis-url", help="the fleet's Redis (default: REDIS_URL)")
    reg.add_argument("--router", metavar="URL", help="register through this router's admin API instead of Redis")
    reg.add_argument("--service", help="model service id (default: from MODEL_SERVICE_CONFIG, else 'default')")
    reg.add_argument("--no-register", action="store_true", help="only start and supervise the engines")
    serve = p.add_argument_group("--serve")
    serve.add_argument(
        "--serve",
        action="store_true",
        help="also run a router (`flexlb serve`; its own redis-server when REDIS_URL is not set) and print its URL",
    )
    serve.add_argument("--serve-port", type=port, default=7001, help="the router's port (default 7001; 0: a free one)")
    serve.add_argument("--serve-host", default="127.0.0.1", help="the router's listen address (default 127.0.0.1)")
    p.add_argument("extra", nargs="*", metavar="-- ENGINE_ARGS", help="passed to every engine, after its own")


def _target(args: argparse.Namespace, settings: Settings) -> Target:
    if args.router and (args.serve or args.redis_url):
        raise PlanError("--router registers through a router's admin API: not with --serve or --redis-url")
    if args.no_register and (args.router or args.redis_url or args.serve):
        raise PlanError("--no-register: not with --router, --redis-url or --serve")
    if args.router and args.service:
        raise PlanError("--router registers in the router's own service: not with --service")
    redis_url = None if args.router or args.no_register else args.redis_url or settings.redis_url
    if not (redis_url or args.router or args.serve or args.no_register):
        raise PlanError(
            "where should the engines be registered? Set REDIS_URL (or --redis-url) to the fleet's Redis, give"
            " --router URL, or --serve (a router of its own); --no-register only runs them"
        )
    if redis_url is not None:
        try:
            parse_redis_url(redis_url)
        except RedisUrlError as exc:
            raise PlanError(f"--redis-url: {exc}") from None
    if args.router is not None and not args.router.startswith(("http://", "https://")):
        raise PlanError(f"--router: expected the router's URL, http://host:port, got {args.router!r}")
    tokens = settings.auth.admin_tokens
    return Target(
        redis_url=redis_url,
        router_url=args.router,
        service=args.service or settings.service.service_id,
        redis_timeout_ms=settings.flexlb.redis_timeout_ms,
        admin_token=tokens[0] if tokens else None,
    )


def cmd_launch(args: argparse.Namespace, settings: Settings, environ: dict[str, str]) -> int:
    try:
        plan = build_plan(
            engine=args.engine,
            count=args.count,
            base_port=args.base_port,
            tp=args.tensor_parallel_size,
            role=args.role,
            model=args.model,
            host=args.host,
            advertise_host=args.advertise_host,
            health_path=args.health_path,
            extra=args.extra,
            template=args.template,
            worker_engine=args.worker_engine,
            gpus_flag=args.gpus,
            environ=environ,
            kv_events_base=args.kv_events_port,
        )
        target = _target(args, settings)
        serve = None
        if args.serve:
            serve_port = args.serve_port or free_port(args.serve_host)
            if serve_port in plan.ports_used:
                raise PlanError(f"--serve-port {serve_port} is one of the engines' ports")
            env = {}
            if args.service:
                env["FLEXLB_SERVICE_ID"] = args.service
            if not settings.flexlb.served_model_name:  # the router serves the engines' model name
                env["SERVED_MODEL_NAME"] = plan.model
            serve = Serve(args.serve_host, serve_port, env)
        busy = ports_in_use(args.host, plan.ports_used)
        if serve is not None:
            busy += ports_in_use(serve.host, [serve.port])
        if busy:
            raise PlanError(f"port {', '.join(map(str, busy))} already in use on {args.host}: nothing started")
    except PlanError as exc:
        print(f"flexlb launch: error: {exc}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="flexlb-launch-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    gpus = f" on GPUs from {plan.gpu_source}" if any(e.gpus for e in plan.engines) else ""
    print(
        f"flexlb launch: starting {len(plan.engines)} {plan.engine} engines{gpus} (logs in {log_dir}) ...",
        flush=True,
    )
    launcher = Launcher(
        plan,
        target,
        log_dir,
        startup_timeout_s=args.startup_timeout,
        stop_grace_s=args.stop_grace,
        serve=serve,
        base_env=environ,
    )
    return launcher.run()
