"""`flexlb up`: one command to a working local fleet - its own redis-server, a `flexlb master`, a router (``--routers``
processes on one port) and simulated workers (fused, or prefill + decode with ``--pd``, whose decode workers wait for
their prefill's KV through a bootstrap server, flexlb.sim.bootstrap), serving the OpenAI API and
the schedule API at a printed URL with copy-paste examples. Ctrl-C (or SIGTERM), at any moment, stops every process
it started. Its processes are a flexlb.stack.local Stack, as `flexlb demo`'s: one launcher."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import orjson

from flexlb.bench.argtypes import int_at_least
from flexlb.cli_options import port
from flexlb.demo.params import WORKER_OPTIONS
from flexlb.domain import Role
from flexlb.embedded_redis import RedisNotInstalled
from flexlb.stack.interrupts import Interrupts
from flexlb.stack.local import Service, Stack, StackError

SERVICE_ID = "default"
MODEL = "flexlb-sim"  # the simulated workers' model name, as the routers serve it


def add_up_parser(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser(
        "up",
        help="start a working local fleet (redis-server, master, router, simulated workers); Ctrl-C stops it",
        description=__doc__,
    )
    up.add_argument("--port", type=port, default=7001, help="the router's port (default 7001; 0: a free one)")
    up.add_argument(
        "--workers", type=int_at_least(1), default=4, help="simulated workers (default 4; with --pd: half each)"
    )
    up.add_argument("--pd", action="store_true", help="prefill and decode workers instead of fused (pdfusion) ones")
    up.add_argument("--routers", type=int_at_least(1), default=1, help="router processes sharing the port (default 1)")


def cmd_up(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    if args.pd and args.workers < 2:
        print("flexlb up: --pd needs --workers 2 or more (a prefill and a decode worker at least)", file=sys.stderr)
        return 2
    roles = (
        [Role.PREFILL] * (args.workers // 2) + [Role.DECODE] * (args.workers - args.workers // 2)
        if args.pd
        else [Role.PDFUSION] * args.workers
    )
    interrupts = Interrupts()
    interrupts.install()
    stack = Stack(checkpoint=interrupts.check)
    failed = False
    try:
        out(f"flexlb up: starting redis-server, a master, {len(roles)} simulated workers and the router ...")
        stack.start_redis()
        service = stack.start_service(
            SERVICE_ID,
            roles,
            WORKER_OPTIONS,
            routers=1,
            router_config={"servedModelName": MODEL, "contendForMaster": False},
            router_port=args.port,
            router_processes=args.routers,
        )
        out(banner(stack, service))
        while True:  # until Ctrl-C; a process that dies ends the fleet with its log
            stack.check_alive(service)
            interrupts.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        out("flexlb up: stopping every process ...")
        return 0
    except (StackError, RedisNotInstalled) as exc:
        failed = True
        print(f"flexlb up: {exc}\nlogs kept in {stack.log_dir}", file=sys.stderr)
        return 1
    finally:
        interrupts.ignore()
        stack.close(keep_logs=failed)


def banner(stack: Stack, service: Service) -> str:
    url = service.routers[0].url
    chat = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}).decode()
    client = (
        f'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="none"); '
        f'print(c.chat.completions.create(model="{MODEL}", messages=[{{"role": "user", "content": "hello"}}], '
        "max_tokens=16).choices[0].message.content)"
    )
    workers = ", ".join(f"{w.role.value} {w.url}" for w in service.workers)
    pd = (
        [f"PD: each decode worker waits for its prefill's KV through the bootstrap server {service.bootstrap_url}"]
        if service.bootstrap_url is not None
        else []
    )
    return "\n".join(
        [
            f"flexlb up: serving on {url}  (model {MODEL!r}; redis {stack.redis_url}; workers: {workers})",
            *pd,
            "",
            f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'",
            f"  python -c '{client}'",
            f'  curl -s -X POST {url}/rtp_llm/schedule -d \'{{"request_id": 1, "seq_len": 100, "debug": true}}\'',
            f"  curl -s -X POST {url}/rtp_llm/release -d '{{\"request_id\": 1}}'",
            "",
            f"Ctrl-C stops everything (logs in {stack.log_dir}).",
        ]
    )
