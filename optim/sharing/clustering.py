"""k-means over the weights of one layer: Lloyd's algorithm in one dimension.

Han, Mao & Dally, "Deep Compression" (ICLR 2016), section 3. The n nonzero
weights w_1..w_n of one layer (layers do not share) are split into k
clusters by minimising the within-cluster sum of squares

    J(c, a) = sum_i (w_i - c_(a_i))^2,    a_i in {0..k-1},  c = the codebook (k floats)

with Lloyd's algorithm, alternating two steps that each can only lower J:

    assignment  a_i <- argmin_j |w_i - c_j|    (nearest centroid)
    update      c_j <- mean of the w_i with a_i = j

A round is one assignment and the update it implies. k-means runs rounds
until the update moves no centroid (the assignment has stopped changing: a
fixed point), or a round lowers J by at most tol * J, or for `iterations`
rounds. The default tol = 0 runs to the fixed point (or until J stops falling
in floating point). J falls in steps between plateaus, so a positive tolerance
stops on a plateau: on the demo's LeNet-5, fc1 at k = 16 from the density
start, tol = 1e-6 stopped after 142 of the 541 rounds to the fixed point with
J 5e-4 above it, while tol = 1e-8 saved at most 5% of the rounds on any layer.
The fixed point took 5 to 2,666 rounds there (dense and 92% pruned, k = 16 to
256, both starts), below the cap of 10,000.

The weights are 1-D, so each cluster is a run of the sorted weights: with
ws = sort(w) and sorted centroids, cluster j is ws[s_j : s_(j+1)], where s_j
counts the weights at least as near c_(j-1) as c_j. A round finds the k - 1
starts s_j by binary search, O(k log n), instead of n nearest-centroid
searches, then J and the sums of the runs in one pass each. `assign` labels each weight once, at the end (a
Numba binary search over the centroids); `assign_ref` and `lloyd_round_ref`
compute the same by their definitions (brute force, np.bincount). A centroid
left with no weights is moved onto the worst-fitted weight (which lowers J
further), so with k >= the number of distinct values every weight ends up
exactly on its centroid.

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

from minicnn.checks import check_array, check_number, check_positive_int
from minicnn.parallel import twin

INITS = ("linear", "density", "random", "kmeans++")
TOL = 0.0  # stop when a round lowers J by at most TOL * J; 0: run to the fixed point
MAX_ROUNDS = 10_000  # the cap on rounds: 3.75x the most LeNet-5's layers took (fc1, k = 256, density)


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


def cluster_starts(ws, centroids):
    """Where each cluster starts in the sorted weights ws (n,) float64, centroids (k,) sorted:
    starts (k+1,) int64, starts[0] = 0, starts[k] = n, cluster j = ws[starts[j] : starts[j+1]].

    The clusters are those of `assign` exactly (ties to the lower centroid, equal centroids all
    to the first): a weight x is past the boundary between c_(j-1) and c_j iff
    x - c_(j-1) > c_j - x, `assign`'s own comparison, which is monotone in x, so the weights
    past it are a suffix of ws. O(k log n): one binary search per boundary, all at once.
    """
    n, lower, upper = ws.size, centroids[:-1], centroids[1:]
    before = np.zeros(lower.size, np.int64)  # weights before each boundary, found bit by bit
    step = 1 << (n.bit_length() - 1)
    while step:
        probe = ws[np.minimum(before + step, n) - 1]
        before += np.where((before + step <= n) & ~(probe - lower > upper - probe), step, 0)
        step >>= 1
    starts = np.concatenate(([0], before, [n]))
    for j in np.flatnonzero(upper == lower)[::-1] + 1:  # a run of equal centroids: the first takes all
        starts[j] = starts[j + 1]
    return starts


def _update(w, residual, counts, sums, centroids):
    """Lloyd's update step: each centroid to the mean of its cluster (counts (k,), sums (k,)),
    an empty cluster's onto the worst-fitted weight (largest |residual| (n,), the larger weight on
    ties, so that the result depends on the weights and not on their order)."""
    new = centroids.copy()
    full = counts > 0
    new[full] = sums[full] / counts[full]
    empty = np.flatnonzero(~full)
    if empty.size:
        error = np.abs(residual)
        worst = np.lexsort((w, error))[::-1][: empty.size]
        worst = worst[error[worst] > 0]
        new[empty[: worst.size]] = w[worst]
    return np.sort(new)


def lloyd_round(ws, centroids):
    """One round of Lloyd's algorithm on the sorted weights ws (n,) float64, centroids (k,) sorted:
    (counts (k,) int64 weights per cluster, J of `centroids`, the updated centroids (k,) sorted).

    The clusters are runs of ws (cluster_starts); J and the runs' sums take one pass each,
    and no weight gets a label."""
    starts = cluster_starts(ws, centroids)
    counts = np.diff(starts)
    residual = np.repeat(centroids, counts)
    np.subtract(ws, residual, out=residual)  # in place: one temporary of n, not three
    full = counts > 0
    sums = np.zeros(centroids.size)
    sums[full] = np.add.reduceat(ws, starts[:-1][full])  # sums between the listed starts: the nonempty runs
    return counts, float(residual @ residual), _update(ws, residual, counts, sums, centroids)


def lloyd_round_ref(w, centroids):
    """lloyd_round by its definition, on weights in any order: brute-force labels, np.bincount sums."""
    k = centroids.size
    labels = assign_ref(w, centroids)
    residual = w - centroids[labels]
    counts = np.bincount(labels, minlength=k)
    return (counts, float(residual @ residual),
            _update(w, residual, counts, np.bincount(labels, w, minlength=k), centroids))


@dataclass
class KMeans:
    """The result of `kmeans`: sorted centroids (k,) float64, labels (n,) int64, J of each round
    (objective[r]: J of the centroids round r assigned), and whether it converged (a fixed point
    or the tolerance) rather than stopped at the cap on rounds."""

    centroids: np.ndarray
    labels: np.ndarray
    objective: list
    converged: bool

    @property
    def rounds(self):
        """The rounds run, the last one the round that found convergence (or the cap)."""
        return len(self.objective)


def kmeans(w, k, init="linear", iterations=MAX_ROUNDS, seed=0, tol=TOL):
    """Lloyd's algorithm on the weights w (n,) float from `init`, until it converges: until a round
    moves no centroid, or lowers J by at most tol * J (tol in [0, 1]), or after `iterations` rounds."""
    w, k = _check_weights(w, k)
    iterations = check_positive_int(iterations, "iterations (the cap on k-means rounds)")
    tol = check_number(tol, "tol (the relative fall of J that stops k-means)", 0.0, 1.0)
    ws = np.sort(w)
    new = init_centroids(w, k, init, seed)
    objective, converged = [], False
    while not converged and len(objective) < iterations:
        centroids = new
        _, J, new = lloyd_round(ws, centroids)
        objective.append(J)
        converged = np.array_equal(new, centroids) or (len(objective) > 1 and objective[-2] - J <= tol * objective[-2])
    return KMeans(centroids, assign(w, centroids), objective, converged)
