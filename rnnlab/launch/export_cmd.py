"""``rnnlab export BUNDLE [--int8]``: give a bundle its ONNX graph (and an int8 one behind a quality gate).

Training writes the graph itself; this is for bundles written before it did, or to add int8. The bundle is
rewritten as training writes one (rnnlab/bundle.py: a complete new folder renamed into place, its checksums in
config.json), with the same weights, so its version does not change.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from rnnlab.launch.cli import add_common_flags

    p = subparsers.add_parser(
        "export", help="write a bundle's model as an ONNX graph (ONNX Runtime serves it on CPUs), optionally int8",
        description="Export a bundle's model as one ONNX graph, checked against the weights on examples of its job "
        "(refused, in one sentence, when it does not answer as they do), and rewrite the bundle with it. With "
        "--int8, also an int8 graph (ONNX Runtime's dynamic quantization of the LSTM and the large linear layers), "
        "kept only when the job's quality gate passes on the validation split rebuilt from the bundle's training "
        "config (sentiment: accuracy within 0.3 points, >= 99 % same labels; charlm: nats/char within 1 %).")
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (e.g. runs/charlm-default/bundle)")
    p.add_argument("--int8", action="store_true", help="also try an int8 graph behind the job's quality gate")
    p.add_argument("--source", metavar="PATH", help="--int8: data file to rebuild the validation split from")
    p.add_argument("--default-runtime", metavar="auto|torch|onnx", default=None,
                   help="the runtime the bundle runs on when none is asked for (default: keep the bundle's)")
    add_common_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rnnlab.errors import InputError
    from rnnlab.export import export_bundle

    if args.source is not None and not args.int8:
        raise InputError("--source gives the data the int8 gate scores; add --int8 or leave it out.")
    graph = export_bundle(args.bundle, int8=args.int8, source=args.source, runtime=args.default_runtime).graph
    print(report(args.bundle, graph))
    return 0


def report(bundle: str, graph: dict) -> str:
    """What a bundle's graph entry says: its parity check and, when tried, the int8 gate's verdict and figures."""
    parity = graph["parity"]
    lines = [f"rnnlab: {bundle} holds {graph['file']}: it answers as the weights do on {parity['examples']} examples "
             f"(largest difference {parity['max_abs_diff']:.2g})."]
    int8 = graph.get("int8")
    if int8 is not None:
        figures = ", ".join(f"{key} {value:.4g}" for key, value in int8.items() if isinstance(value, float))
        verdict = f"kept as {int8['file']}" if int8["passed"] else f"refused: {int8['failed']}; the graph stays fp32"
        lines.append(f"rnnlab: int8 {verdict}" + (f" ({figures})." if figures else "."))
    return "\n".join(lines)
