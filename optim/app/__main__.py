"""`python -m optim.app`: the `minicnn` command line."""

from .cli import main

raise SystemExit(main())
