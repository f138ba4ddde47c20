"""The ``rnnlab`` command: one entry point, one subcommand per job a user does.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the parser it adds sets
``func`` to a ``run(args) -> int``. Heavy imports (torch, ray) happen inside ``run`` so ``--help`` is instant.
Errors the user can fix (``RnnlabError``) print one sentence and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from rnnlab import __version__
from rnnlab.errors import RnnlabError

# (module, what it is for) in the order ``--help`` lists them.
# Each module's owner adds it here when it lands.
SUBCOMMAND_MODULES = (
    "rnnlab.launch.data_cmd",
    "rnnlab.launch.train",
    "rnnlab.launch.predict_cmd",
    "rnnlab.launch.export_cmd",
    "rnnlab.launch.tune",
    "rnnlab.launch.serve_cmd",
    "rnnlab.launch.swap_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnlab",
        description="Train, tune and serve recurrent sequence models: IMDb sentiment, stock index forecasting, "
        "and a War and Peace character language model.",
        epilog="Run 'rnnlab COMMAND --help' for a command's options. Data comes from --data-mirror / "
        "RNNLAB_DATA_MIRROR when set, else the download cache (RNNLAB_CACHE_DIR, default ~/.cache/rnnlab).",
    )
    parser.add_argument("--version", action="version", version=f"rnnlab {__version__}")
    add_common_flags(parser)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every command accepts (also before the command name)."""
    parser.add_argument(
        "--data-mirror",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="folder holding local copies of the data sets (overrides RNNLAB_DATA_MIRROR)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except RnnlabError as error:  # a job from another package (RNNLAB_JOBS, an entry point) that does not load
        print(f"rnnlab: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", 0) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "data_mirror", None):
        os.environ["RNNLAB_DATA_MIRROR"] = args.data_mirror
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RnnlabError as error:
        print(f"rnnlab: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnnlab: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
