"""``rnnlab swap MODEL_ID BUNDLE``: point a served model id at another bundle while the service answers.

Through Ray Serve's in-place update (rnnlab/serve/versions.py): the running application's config gets the new
bundle folder in the model deployment's ``user_config``, and Ray reconfigures each replica without restarting it
or taking it out of service. The bundle is checked here first (readable, checksums, the same job as the id
serves): a bad one is one sentence and nothing changes.
"""

from __future__ import annotations

import argparse
import logging

from rnnlab.errors import RnnlabError, first_line


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


def bring_token() -> None:
    """``rnnlab serve`` starts its Ray instance with Ray's token authentication on (Ray's default for a new
    instance); a driver joining it sends the token (~/.ray/auth_token, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)
    only with RAY_AUTH_MODE=token, and fails with "Failed to connect" otherwise. Set it when a token is there and
    the mode is not chosen already."""
    import os
    from pathlib import Path

    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def run(args: argparse.Namespace) -> int:
    bring_token()  # before Ray is imported: it reads the mode then
    import ray

    from rnnlab.cluster import connect
    from rnnlab.serve.versions import check_new_bundle, swap

    check_new_bundle(args.bundle)  # before any cluster is asked for anything: readable, checksums, weights
    try:
        connect(args.address, namespace="serve", logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, TimeoutError) as error:
        raise RnnlabError(f"Ray could not be reached at {args.address} ({first_line(error)}); pass the --address "
                          "rnnlab serve printed.") from None
    try:
        # Serve's INFO lines ("Started <SharedRouterLongPollClient ...>") are not the operator's business here;
        # a filter, because Serve sets its logger's level again when a handle is made
        logging.getLogger("ray.serve").addFilter(lambda record: record.levelno >= logging.WARNING)
        swap({args.model_id: args.bundle}, timeout_s=args.timeout_s)
    finally:
        ray.shutdown()
    return 0
