"""k-means over the weights of one layer: Lloyd's algorithm in one dimension.

Han, Mao & Dally, "Deep Compression" (ICLR 2016), section 3. The n nonzero
weights w_1..w_n of one layer (layers do not share) are split into k
clusters by minimising the within-cluster sum of squares

    J(c, a) = sum_i (w_i - c_(a_i))^2,    a_i in {0..k-1},  c = the codebook (k floats)

with Lloyd's algorithm, alternating two steps that each can only lower J:

    assignment  a_i <- argmin_j |w_i - c_j|    (nearest centroid)
    update      c_j <- mean of the w_i with a_i = j

until the assignment stops changing. The weights are 1-D, so with the
centroids sorted the nearest one is found by binary search (a Numba kernel,
beside a brute-force NumPy reference). A centroid left with no weights is
moved onto the worst-fitted weight (which lowers J further), so with k >= the
number of distinct values every weight ends up exactly on its centroid.

Initialisation matters (the paper's Fig. 4): `linear` spaces the centroids
evenly over [min w, max w], which keeps a few centroids among the rare large
weights, the important ones; `density` spaces them evenly over the CDF
(quantiles); `random` is Forgy's (k distinct weights drawn at random);
`kmeans++` (Arthur & Vassilvitskii 2007) draws each next centroid with
probability proportional to the squared distance to the nearest one so far.
"""

from dataclasses import dataclass

import numpy as np
from numba import prange

from minicnn.checks import check_array, check_positive_int
from minicnn.parallel import twin

INITS = ("linear", "density", "random", "kmeans++")


def _check_weights(w, k):
    check_array(w, "weights", ndim=1)
    k = check_positive_int(k, "k (the number of clusters)", minimum=2)
    if k > w.size:
        raise ValueError(f"k = {k} clusters for only {w.size} (nonzero) weights: k must be at most {w.size}")
    return w.astype(np.float64), int(k)


def init_centroids(w, k, method="linear", seed=0):
    """k starting centroids (k,) float64, sorted, for the weights w (n,) float."""
    w, k = _check_weights(w, k)
    rng = np.random.default_rng(seed)
    if method == "linear":
        c = np.linspace(w.min(), w.max(), k)
    elif method == "density":
        c = np.quantile(w, np.linspace(0, 1, k))
    elif method == "random":
        c = rng.choice(w, size=k, replace=False)
    elif method == "kmeans++":
        c = np.empty(k)
        c[0] = w[rng.integers(w.size)]
        d2 = (w - c[0]) ** 2  # squared distance of each weight to its nearest centroid so far
        for j in range(1, k):
            total = d2.sum()
            pick = rng.integers(w.size) if total == 0 else np.searchsorted(np.cumsum(d2), rng.random() * total)
            c[j] = w[min(pick, w.size - 1)]
            np.minimum(d2, (w - c[j]) ** 2, out=d2)
    else:
        raise ValueError(f"unknown init {method!r}; choose one of {', '.join(INITS)}")
    return np.sort(c)


def _assign_loop(w, centroids, out):
    # Branch-free binary search, O(log k): measured 1.3x faster than a loop over all k centroids
    # at k = 32 and 4x at k = 256; on LeNet-5's fc1 it is 3.4x (k = 32) and 29x (k = 256) faster
    # than the brute-force reference, and on par with np.searchsorted (bench/bench_sharing.py).
    k = centroids.size
    for i in prange(w.size):
        x = np.float64(w[i])
        lo, n = 0, k
        while n > 1:  # invariant: the nearest centroid is among centroids[lo : lo + n]
            half = n >> 1
            lo = lo + half if x - centroids[lo + half - 1] > centroids[lo + half] - x else lo
            n -= half
        while lo > 0 and centroids[lo - 1] == centroids[lo]:  # a tie between duplicates: the first
            lo -= 1
        out[i] = lo


# k-means assigns whole layers, off the latency path: threaded whenever threads are allowed,
# as before minicnn.parallel's rule (its break-even was never measured).
_assign = twin(_assign_loop, min_work=0)


def assign(w, centroids):
    """Index (n,) int64 of the nearest centroid to each weight; centroids (k,) sorted ascending.
    Ties go to the lower centroid."""
    out = np.empty(w.size, np.int64)
    _assign(w.size, np.ascontiguousarray(w, np.float64), np.ascontiguousarray(centroids, np.float64), out)
    return out


def assign_ref(w, centroids, chunk=8192):
    """The definition: argmin_j |w_i - c_j| by brute force (chunked to bound the (chunk, k) scratch)."""
    w, c = np.asarray(w, np.float64), np.asarray(centroids, np.float64)
    return np.concatenate([np.argmin(np.abs(w[i : i + chunk, None] - c[None, :]), axis=1)
                           for i in range(0, w.size, chunk)] or [np.zeros(0, np.int64)])


@dataclass
class KMeans:
    """The result of `kmeans`: sorted centroids (k,) float64, labels (n,) int64 and J per iteration."""

    centroids: np.ndarray
    labels: np.ndarray
    objective: list


def _update(w, labels, centroids):
    """Lloyd's update step, with empty clusters moved onto the worst-fitted weights."""
    k = centroids.size
    counts = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=w, minlength=k)
    new = centroids.copy()
    new[counts > 0] = sums[counts > 0] / counts[counts > 0]
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        error = (w - centroids[labels]) ** 2
        worst = np.argsort(error, kind="stable")[::-1][: empty.size]
        worst = worst[error[worst] > 0]
        new[empty[: worst.size]] = w[worst]
    return np.sort(new)


def kmeans(w, k, init="linear", iterations=50, seed=0):
    """Lloyd's algorithm on the weights w (n,) float, from `init`, for at most `iterations` rounds."""
    w, k = _check_weights(w, k)
    iterations = check_positive_int(iterations, "iterations")
    centroids = init_centroids(w, k, init, seed)
    objective = []
    for _ in range(iterations):
        labels = assign(w, centroids)
        objective.append(float(((w - centroids[labels]) ** 2).sum()))
        new = _update(w, labels, centroids)
        if np.array_equal(new, centroids):
            break
        centroids = new
    else:
        labels = assign(w, centroids)
        objective.append(float(((w - centroids[labels]) ** 2).sum()))
    return KMeans(centroids, labels, objective)
