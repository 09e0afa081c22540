"""Regenerate the committed protobuf/gRPC code from the ``.proto`` files in ``protos/``.

Run ``python -m flexlb.proto.generate`` after editing a .proto (``--check`` only compares). protoc's gRPC plugin
writes ``import flexlb_worker_pb2`` (a top-level import that fails inside a package); this rewrites it to an import
from ``flexlb.proto`` so the output is reproducible byte for byte, which ``tests/unit/test_proto_wire.py`` checks.
Needs ``grpcio-tools`` (a test dependency); the output depends on its version, so regenerate with the pinned one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parents[1] / "protos"  # the repository's protos/ (not shipped in wheels)
# RTP-LLM's worker status RPCs (the master polls them) and flexlb's own gRPC schedule API (flexlb.v1).
PROTO_FILES = ("flexlb_worker.proto", "flexlb_schedule.proto")


def generated_names(proto_file: str) -> tuple[str, str, str]:
    """The messages, their type stubs and the gRPC stubs protoc writes for ``proto_file``."""
    stem = proto_file.removesuffix(".proto")
    return f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"


GENERATED_FILES = tuple(name for proto in PROTO_FILES for name in generated_names(proto))


def _package_import(grpc_code: str, proto_file: str) -> str:
    """Rewrite the gRPC code's top-level import of its messages to an import from ``flexlb.proto``."""
    stem = proto_file.removesuffix(".proto")
    alias = stem.replace("_", "__") + "__pb2"  # protoc's alias: flexlb_worker -> flexlb__worker__pb2
    top_level = f"import {stem}_pb2 as {alias}\n"
    # Exactly one occurrence, so a change in protoc's output fails here instead of shipping a broken import.
    if grpc_code.count(top_level) != 1:
        raise RuntimeError(f"expected one {top_level.strip()!r} in the gRPC code; protoc's output changed")
    return grpc_code.replace(top_level, f"from flexlb.proto import {stem}_pb2 as {alias}\n")


def render(proto_dir: Path = PROTO_DIR) -> dict[str, bytes]:
    """Run protoc on every file of PROTO_FILES in ``proto_dir``, in a temporary directory; return name -> content."""
    from grpc_tools import protoc  # imported here: only needed to regenerate, not to use the generated code

    files: dict[str, bytes] = {}
    for proto_file in PROTO_FILES:
        proto = proto_dir / proto_file
        if not proto.is_file():
            raise FileNotFoundError(f"{proto} not found: run from a source checkout of flexlb")
        with tempfile.TemporaryDirectory(prefix="flexlb-protoc-") as tmp:
            status = protoc.main(
                [
                    "grpc_tools.protoc",  # argv[0], ignored
                    f"-I{proto_dir}",
                    f"--python_out={tmp}",
                    f"--pyi_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    str(proto),
                ]
            )
            if status != 0:
                raise RuntimeError(f"protoc failed with status {status} on {proto} (its errors are on stderr)")
            messages, stubs, grpc_name = generated_names(proto_file)
            files[messages] = (Path(tmp) / messages).read_bytes()
            files[stubs] = (Path(tmp) / stubs).read_bytes()
            files[grpc_name] = _package_import((Path(tmp) / grpc_name).read_text(), proto_file).encode()
    return files


def generate(out_dir: Path = PACKAGE_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Write the generated files into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render(proto_dir).items():
        path = out_dir / name
        path.write_bytes(content)
        written.append(path)
    return written


def stale_files(out_dir: Path = PACKAGE_DIR, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Names of the files in ``out_dir`` that differ from a fresh generation (or are missing)."""
    stale = []
    for name, content in render(proto_dir).items():
        path = out_dir / name
        if not path.is_file() or path.read_bytes() != content:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexlb.proto.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {PACKAGE_DIR / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
