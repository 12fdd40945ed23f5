from hypothesis import settings

# JIT compilation on first call would blow any per-example deadline.
settings.register_profile("minicnn", deadline=None, max_examples=40, print_blob=True)
settings.load_profile("minicnn")
