"""Write files so that a crash or an error never leaves a half-written one.

The data go to a temporary file in the destination's folder (same file
system, so the final rename is atomic), are flushed to disk, and only then
renamed over the destination. If anything fails, the temporary file is
removed and the old destination, if any, is untouched.
"""

import contextlib
import os
import stat
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # A short name of its own: the destination's name may already be as long as names can be.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _mode_for(path):
    """The permissions the written file gets: those of the file it replaces, else the umask's default."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_file(path, data):
    """Write `data` (str or bytes) to `path` through atomic_path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


def save_figure(fig, path):
    """Save the matplotlib Figure `fig` as a PNG at `path` through atomic_path (matplotlib is the
    caller's import: minicnn does not need it)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
