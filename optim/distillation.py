"""Knowledge distillation: a small student learns from a large teacher's softened outputs.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
NIPS Deep Learning Workshop 2015 (arXiv:1503.02531).

For teacher logits t and student logits s (K classes) at temperature T > 0,

    p = softmax(t / T)   the soft targets        q = softmax(s / T)

and the student minimises, averaged over the N samples of a batch,

    L = alpha * T^2 * KL(p || q) + (1 - alpha) * CE(s, y)
    KL(p || q) = sum_k p_k (log p_k - log q_k)

A high T lifts the tiny probabilities the teacher gives to wrong classes
(this 2 looks a little like a 7, hardly like a 4): that "dark knowledge"
about how the classes resemble each other is what hard labels lack.

The gradient. Only log q depends on s, and d log q_j / d s_k = (delta_jk - q_k) / T,
so d KL / d s = (q - p) / T. With the mean over the batch:

    dL/ds = alpha * T * (q - p) / N + (1 - alpha) * (softmax(s) - onehot(y)) / N

Why T^2. For large T, softmax(z / T)_k ~ (1 + z_k / T) / (K + sum_j z_j / T), so
for logits of zero mean q - p ~ (s - t) / (K T): the soft term's gradient
(q - p) / T shrinks as 1 / T^2. Multiplying by T^2 makes it (s - t) / K, the
same order at every temperature, so alpha keeps its meaning (the share of the
soft targets in the gradient) when T changes, and in the high-temperature
limit distillation is matching the logits with the squared error
||s - t||^2 / 2K (Caruana's "model compression").
"""

import numpy as np
from tqdm.auto import tqdm

from minicnn.checks import check_array, check_labels, check_positive_int
from minicnn.losses import log_softmax
from minicnn.optimizers import Adam
from minicnn.training import evaluate, fit


def check_hyperparameters(temperature, alpha):
    """Raise ValueError unless T is a finite number > 0 and alpha lies in [0, 1]."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0 <= alpha <= 1:  # also False for NaN
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    """(L, dL/ds) of the distillation objective above, averaged over the batch.

    student_logits s (N, K) float, teacher_logits t (N, K) float, labels y (N,) int
    in [0, K). The loss is a float; dL/ds has the shape and dtype of s.
    """
    check_hyperparameters(temperature, alpha)
    s = check_array(student_logits, "student logits", ndim=2)
    t = check_array(teacher_logits, "teacher logits", ndim=2)
    if s.shape != t.shape:
        raise ValueError(f"student logits {s.shape} and teacher logits {t.shape} differ: "
                         "teacher and student must see the same samples and have the same classes")
    N, K = s.shape
    check_labels(labels, N, K, name="labels")
    t = t.astype(s.dtype, copy=False)
    log_p = log_softmax(t, temperature)
    log_q = log_softmax(s, temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    kl = (p * (log_p - log_q)).sum() / N
    log_hard = log_softmax(s)
    rows = np.arange(N)
    ce = -log_hard[rows, labels].sum() / N
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    hard = np.exp(log_hard)
    hard[rows, labels] -= 1
    grad = (alpha * temperature * (q - p) + (1 - alpha) * hard) / N
    return float(loss), grad.astype(s.dtype, copy=False)


def teacher_logits(teacher, x, num_classes, batch_size=256):
    """The teacher's logits (N, K) float32 on x, computed once, batch by batch.

    num_classes: the student's K; a teacher with another number of classes
    cannot teach it, so that is a ValueError.
    """
    logits = teacher.predict(x, batch_size=batch_size)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"the teacher predicts logits of shape {logits.shape}, "
                         f"the student has {num_classes} classes")
    return check_array(logits, "teacher logits", ndim=2)


def distill(teacher, student, x, y, temperature=4.0, alpha=0.9, epochs=10, batch_size=64,
            optimizer=None, seed=0, validation=None, verbose=True, in_place=False):
    """Train `student` on the transfer set (x, y) to match `teacher`; return the trained student.

    teacher: anything with predict(x) -> logits (N, K) (a minicnn model file);
    student: a Sequential with K outputs, trained by `minicnn.fit` (progress
    bar when verbose); x (N, C, H, W) float32, y (N,) int. The teacher's logits
    are computed once for the whole transfer set, and the loss looks up the
    batch's rows by their indices. optimizer defaults to Adam(1e-3). The
    student is copied first unless in_place.
    """
    check_hyperparameters(temperature, alpha)
    check_array(x, "x")
    student = student if in_place else student.copy()
    targets = teacher_logits(teacher, x, student.num_classes)

    def loss(z, idx):
        return distillation_loss(z, targets[idx], y[idx], temperature, alpha)

    fit(student, x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, seed=seed,
        loss=loss, validation=validation, verbose=verbose)
    return student
