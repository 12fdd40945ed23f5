"""Running trials: in this process, in a local process pool, or on a Dask cluster; the trial log.

A trial is `recipe.run(candidate, context, seed)`, a pure function, so where it
runs changes nothing but the wall time. Results are collected by submission
index, never by completion order, so a run's outcome is the same whichever
executor ran it:

    workers = 1           in this process, one after the other
    workers = N > 1       concurrent.futures.ProcessPoolExecutor (spawn): the context (model and
                          images) is sent once to each worker by its initializer
    scheduler = ADDRESS   dask.distributed (Rocklin 2015; `dask scheduler` on one machine,
                          `dask worker ADDRESS` on the others): the context is scattered to every
                          worker once; dask is imported only here, only then

The trial log (JSON lines, one flush per line) makes a killed run resumable:

    line 1   {"fingerprint": sha256(model file bytes + settings JSON + code version),
              "settings": {...}, "version": minicnn.__version__}
    then     {"key": sha256(candidate JSON)[:16], "candidate": {...}, "points": [...]}

A finished trial is only logged after its model files are written, so a key in the
log means its files exist. A log whose fingerprint differs (another model file,
other settings, or another version of the code, whose trials may give other
results) is refused with a ValueError, never mixed in.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os

from tqdm import tqdm

from minicnn import __version__
from minicnn.atomic import write_file
from minicnn.datasets import file_hash

from . import recipe

CONNECT_TIMEOUT = 5  # seconds to reach a Dask scheduler before giving up


def candidate_key(candidate):
    return hashlib.sha256(json.dumps(candidate, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(model_path, settings):
    """sha256 of the model file's bytes, the settings and the code version: what a trial's result depends on."""
    digest = hashlib.sha256(file_hash(model_path, "sha256").encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(__version__.encode())
    return digest.hexdigest()


class TrialLog:
    """The run's trial log in `folder`: finished trials by key, model files under folder/models/."""

    def __init__(self, folder, fingerprint, settings):
        self.path = os.path.join(folder, "trials.jsonl")
        self.models = os.path.abspath(os.path.join(folder, "models"))  # front.json paths work from anywhere
        os.makedirs(self.models, exist_ok=True)
        self.done = {}
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._read(fingerprint)
        else:
            # whole or not at all: a run killed here must not leave a log that later runs refuse
            write_file(self.path, json.dumps({"fingerprint": fingerprint, "settings": settings,
                                              "version": __version__}) + "\n")

    def _read(self, expected):
        with open(self.path) as f:
            lines = f.read().splitlines()
        try:
            head = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            raise ValueError(f"{self.path} is not a trial log of `minicnn compress --auto`") from None
        if head.get("version") != __version__:
            by = f"minicnn {head['version']}" if "version" in head else "an older minicnn (no version recorded)"
            raise ValueError(f"{self.path} was written by {by}, not by this minicnn {__version__}, whose trials may "
                             f"give other results; use another --out folder or delete it")
        if head.get("fingerprint") != expected:
            raise ValueError(f"{self.path} belongs to another model file or other settings "
                             f"({head.get('settings')}); use another --out folder or delete it")
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed mid-write: that trial runs again
            if all(os.path.exists(self.file(entry["key"], p["kind"])) for p in entry["points"]):
                self.done[entry["key"]] = entry["points"]

    def file(self, key, kind):
        return os.path.join(self.models, f"{key}-{kind}.npz")

    def record(self, key, candidate, points):
        """Write each point's model file, then append the trial's line (flushed); returns the points
        without their file bytes, each with its "path"."""
        kept = []
        for p in points:
            path = self.file(key, p["kind"])
            write_file(path, p["file"])
            kept.append({k: v for k, v in p.items() if k != "file"} | {"path": path})
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "candidate": candidate, "points": kept}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = kept
        return kept


# --------------------------------------------------------------------------
# Executors: each maps run_trial over [(candidate, seed)] and yields (position, points) as done

BLAS_THREADS = "OPENBLAS_NUM_THREADS"
_CONTEXT = {}  # the context of this worker process, set once by the pool's initializer


def _set_context(context):
    _CONTEXT.update(context)


def _pool_trial(candidate, seed):
    return recipe.run(candidate, _CONTEXT, seed)


class LocalExecutor:
    """Trials in this process (workers = 1) or a spawned process pool (workers > 1).

    Each worker gets cores // workers OpenBLAS threads (unless OPENBLAS_NUM_THREADS is set
    already): its threads busy-wait for work, and two workers with a thread per core each ran
    a LeNet-5 trial in 65 s, against 17 s with one each, on 2 cores. OpenBLAS reads the variable
    when numpy loads, so it is set while the pool spawns its workers and put back on close.
    """

    def __init__(self, context, workers):
        self.context, self.workers, self.pool, self.blas_set = context, workers, None, False
        if workers > 1:
            if BLAS_THREADS not in os.environ:
                os.environ[BLAS_THREADS] = str(max(1, (os.cpu_count() or 1) // workers))
                self.blas_set = True
            try:
                self.pool = concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("spawn"), initializer=_set_context,
                    initargs=(context,))
            except BaseException:
                self.close()
                raise

    def map(self, jobs):
        if self.pool is None:
            for position, (candidate, seed) in enumerate(jobs):
                yield position, recipe.run(candidate, self.context, seed)
            return
        futures = {self.pool.submit(_pool_trial, c, s): i for i, (c, s) in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
        if self.blas_set:
            del os.environ[BLAS_THREADS]


class DaskExecutor:
    """Trials on a dask.distributed cluster reached at `address`."""

    def __init__(self, context, address):
        try:
            from distributed import Client
        except ImportError:
            raise ValueError("--scheduler needs dask's distributed scheduler: pip install 'minicnn[dask]'") from None
        try:
            self.client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise ValueError(f"cannot reach the Dask scheduler at {address} within {CONNECT_TIMEOUT} s: "
                             f"{type(e).__name__}: {e}") from None
        self.context = self.client.scatter(context, broadcast=True)

    def map(self, jobs):
        from distributed import as_completed

        futures = [self.client.submit(recipe.run, c, self.context, s, pure=False) for c, s in jobs]
        positions = {f.key: i for i, f in enumerate(futures)}
        with self.client.as_current():  # as_completed looks for the client of this context
            for future in as_completed(futures):
                yield positions[future.key], future.result()

    def close(self):
        self.client.close()


def executor(context, workers=1, scheduler=None):
    return DaskExecutor(context, scheduler) if scheduler else LocalExecutor(context, workers)


def run_trials(jobs, log, runner, progress=True):
    """Run the (candidate, seed) jobs not in the log yet; returns [points] in the jobs' order.

    Each finished trial is logged (files first, then its line) the moment it comes back, so a
    run killed at any point loses at most the trials still running.
    """
    keys = [candidate_key(c) for c, _ in jobs]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}  # a candidate asked twice runs once
    todo = [i for key, i in sorted(first.items(), key=lambda item: item[1]) if key not in log.done]
    bar = tqdm(total=len(first), initial=len(first) - len(todo), desc="trials", unit="trial", disable=not progress)
    for position, points in runner.map([jobs[i] for i in todo]):
        i = todo[position]
        log.record(keys[i], jobs[i][0], points)
        bar.update(1)
    bar.close()
    return [log.done[key] for key in keys]
