"""`splitserve scale`: sets a running server's instance counts per role (the admin `Scale` RPC)."""
from __future__ import annotations

import sys

from splitserve.cluster.serve_cli import add_target_arguments


def add_arguments(p) -> None:
    add_target_arguments(p)
    p.add_argument("--prefill", type=int, default=None, help="target number of prefill instances")
    p.add_argument("--decode", type=int, default=None, help="target number of decode instances")
    p.add_argument("--colocated", type=int, default=None, help="target number of colocated instances")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds a removed instance may finish its requests before they move (default 30)")


def run(args) -> int:
    import grpc

    from splitserve.proto.client import Client

    if args.prefill is None and args.decode is None and args.colocated is None:
        print("splitserve: error: give --prefill, --decode or --colocated", file=sys.stderr)
        return 2
    with Client(args.server, token=args.token, tls_ca=args.tls_ca, timeout=args.timeout or 900) as client:
        try:
            result = client.scale(args.prefill, args.decode, args.colocated, args.drain_timeout)
        except grpc.RpcError as e:
            print(f"splitserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print("added: " + (", ".join(result.added) or "none") + "; removed: " + (", ".join(result.removed) or "none"))
    print("instances: " + ", ".join(f"{r.role} {r.instances}" for r in result.roles))
    return 0
