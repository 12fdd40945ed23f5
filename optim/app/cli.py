"""The `minicnn` command line (also `python -m optim.app`).

    minicnn train --model lenet5 --data mnist10k --epochs 10 --out lenet5.npz
    minicnn demo | prune | quantize | distill | cut | compress | export ...

Every subcommand lives in commands.py; this module builds the parser from
them and reports errors as messages, not tracebacks.
"""

import argparse
import sys

from .commands import add_commands


def build_parser():
    parser = argparse.ArgumentParser(prog="minicnn", description="A small CNN from scratch, and how to make it smaller and faster.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:  # bad input, a bad file, a model of the wrong kind
        print(f"minicnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
