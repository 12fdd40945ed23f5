"""The application on top of the library: the `minicnn` command line and the demo.

What lives where:
    cli.py       the parser and main(): the `minicnn` console script, `python -m optim.app`
    commands.py  every subcommand (train, demo, prune, quantize, distill, cut, compress)
    demo.py      `minicnn demo`: every technique on the seed CNN and LeNet-5, measured
    report.py    the demo's report.json / report.md and the README table
    plots.py     the demo's plots (matplotlib, an optional extra)

Nothing in minicnn or in optim's techniques imports this package.
"""

from .cli import main

__all__ = ["main"]
