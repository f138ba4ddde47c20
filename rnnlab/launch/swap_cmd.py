"""``rnnlab swap MODEL_ID BUNDLE``: point a served model id at another bundle while the service answers.

Through Ray Serve's in-place update (rnnlab/serve/versions.py): the running application's config gets the new
bundle folder in the model deployment's ``user_config``, and Ray reconfigures each replica without restarting it
or taking it out of service. The bundle is checked first (readable, checksums, the same job as the id
serves): a bad one is one sentence and nothing changes.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "swap",
        help="point a served model id at another bundle, in place (no restart, no dropped request)",
        description="Point MODEL_ID of a running `rnnlab serve` at BUNDLE (a retrained version, or a rollback to "
        "an earlier one) through Ray Serve's in-place reconfiguration: replicas keep answering while it loads, "
        "and every answer names the version it came from (`model`: ID@VERSION). A bundle that is unreadable, "
        "fails its checksums or belongs to another job is refused, and the old one keeps serving.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_id", metavar="MODEL_ID", help="a model id GET /v1/models lists")
    parser.add_argument("bundle", metavar="BUNDLE", help="the bundle folder to serve under MODEL_ID from now on "
                        "(readable by the service's machines)")
    parser.add_argument("--address", default="auto",
                        help="the service's Ray cluster: the address `rnnlab serve` printed, or 'auto' (the last "
                        "one started on this machine)")
    parser.add_argument("--timeout-s", type=float, default=300, help="how long to wait for every replica")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rnnlab.serve.versions import swap_at

    swap_at(args.address, {args.model_id: args.bundle}, timeout_s=args.timeout_s)
    return 0
