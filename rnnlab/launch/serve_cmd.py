"""``rnnlab serve --bundles DIR``: the HTTP service over trained bundles (Ray Serve, FastAPI ingress).

The flags become the application's arguments and rnnlab/serve/service.py runs it (checks first, then Ray). The
same application runs under Ray's own CLI: ``serve run configs/serve.yaml`` (see that file for replicas,
autoscaling, batch sizes and GPU fractions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnlab.errors import ConfigError
from rnnlab.registry import routes, served
from rnnlab.serve.auth import ENV_VAR
from rnnlab.serve.limits import LIMITS
from rnnlab.serve.replicas import MIN_CPU_SHARE


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help=f"serve trained bundles over HTTP (Ray Serve): {', '.join(served())}",
        description="Serve the bundles in DIR over HTTP with Ray Serve: POST /v1/<job> for "
        f"{', '.join(served())} (older routes: "
        f"{', '.join(f'/v1/{a} = /v1/{j}' for a, j in routes().items() if a != j)}, "
        "kept for one release); POST /v1/completions (OpenAI's API, for the openai client); GET /v1/models, "
        "/healthz; OpenAPI at /docs. Concurrent requests are batched.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--bundles", required=True, metavar="DIR",
                        help="folder holding bundles as sub-folders (each bundle's config.json names its job)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; another than loopback (0.0.0.0) needs an API key or --insecure")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster to deploy onto ('auto' or HOST:PORT of its head; replicas "
                        "spread over its nodes, HTTP enters on the head); default starts a new local instance "
                        "(never a stale one left under the Ray temp folder)")
    parser.add_argument("--api-key-file", metavar="FILE", default=None,
                        help="file holding the API key every /v1/* request must send as 'Authorization: Bearer "
                        f"KEY' (also from ${ENV_VAR}); /healthz stays open")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without an API key")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="port of Ray's Prometheus endpoint (/metrics), with rnnlab_* metrics beside Serve's")
    parser.add_argument("--default-model", action="append", metavar="MODEL_ID", default=None,
                        help="the model a job's route answers with when a request names none (repeat for each "
                        "job); default: the job's first model id in name order (ids: the bundles' folder names)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="batch size for every model deployment (generation: sequences decoded together)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="replicas of each job's model deployment (the Gateway stays one): with 2 or more, a "
                        "replica that dies costs only the requests it held, the next ones go to a live replica at "
                        "once instead of waiting for a restart. Every replica, the Gateway's included, reserves an "
                        f"equal share of the Ray cluster's CPUs, at least {MIN_CPU_SHARE} CPU: when they do not "
                        "fit, serve refuses to start and names how many replicas would")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="threads per replica, torch's or ONNX Runtime's intra-op ones (also the most CPUs a "
                        "replica reserves)")
    parser.add_argument("--runtime", metavar="auto|torch|onnx", default=None,
                        help="what runs every model: onnx (ONNX Runtime on the CPU, from the bundle's graph), torch, "
                        "or auto (onnx on a CPU where the bundle holds a graph, torch on a GPU or without one); "
                        "default: each bundle's own default, else auto")
    parser.add_argument("--proxy", action="store_true",
                        help="take HTTP through Ray Serve's proxy actor, as on a cluster (--address implies it). "
                        "By default the Gateway replica listens on --port itself (Ray Serve's direct ingress): "
                        "one hop fewer, about 5x the request rate on a small CPU")
    limits = parser.add_argument_group("limits (also configs/serve.yaml args)")
    for name, (kind, default, _, what) in LIMITS.items():
        # "%(default).0s" prints nothing and keeps the formatter from adding "(default: None)"
        limits.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar=kind.__name__.upper(),
                            help=f"{what} (default: {kind(default)})%(default).0s")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rnnlab.serve import service
    from rnnlab.serve.auth import load_key, refuse_exposed_without_key
    from rnnlab.serve.limits import check_limits

    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be at least 1, got {args.max_batch_size}.")
    limits = check_limits({name: getattr(args, name) for name in LIMITS}, flags=True)
    refuse_exposed_without_key(args.host, load_key(args.api_key_file) is not None, args.insecure)
    # The application's arguments, as a config's `args` (JSON; absolute paths: Ray builds the application in a
    # task of its own).
    app_args = {"bundles": str(Path(args.bundles).expanduser().resolve()), "replicas": args.replicas,
                "torch_threads": args.torch_threads,
                "max_batch_size": args.max_batch_size, "default_models": args.default_model or None,
                "runtime": args.runtime,
                "api_key_file": str(Path(args.api_key_file).expanduser().resolve()) if args.api_key_file else None}
    app_args = {key: value for key, value in app_args.items() if value is not None} | limits
    return service.run(app_args, host=args.host, port=args.port, address=args.address, proxy=args.proxy,
                       metrics_port=args.metrics_port, verbose=bool(getattr(args, "verbose", 0)))
