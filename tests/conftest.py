import os

from hypothesis import settings

# JIT compilation on first call would blow any per-example deadline.
settings.register_profile("minicnn", deadline=None, max_examples=40, print_blob=True)
# CI (.ci/run) draws the same examples on every run, so that a push lands or fails on its own
# merits; local runs draw new ones each time, and keep the failures they find in .hypothesis/.
settings.register_profile("ci", parent=settings.get_profile("minicnn"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "minicnn"))
