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

`compare` and `omitted_class` redo the paper's MNIST experiments (section 3) in small.
"""

import numpy as np
from tqdm.auto import tqdm

from minicnn.checks import check_array, check_labels, check_positive_int
from minicnn.datasets import split_validation
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


def distill(teacher, student, x, y, temperature=8.0, alpha=0.9, epochs=10, batch_size=64,
            optimizer=None, seed=0, validation=None, verbose=True, in_place=False):
    """Train `student` on the transfer set (x, y) to match `teacher`; return the trained student.

    teacher: anything with predict(x) -> logits (N, K) (a minicnn model file);
    student: a Sequential with K outputs; x (N, C, H, W) float32, y (N,) int.
    The teacher's logits are computed once for the whole transfer set, then
    `learn_from_logits` trains. optimizer defaults to Adam(1e-3). The student
    is copied first unless in_place.
    """
    check_hyperparameters(temperature, alpha)
    check_array(x, "x")
    targets = teacher_logits(teacher, x, student.num_classes)
    return learn_from_logits(student, x, y, targets, temperature, alpha, epochs, batch_size,
                             optimizer, seed, validation, verbose, in_place)


def learn_from_logits(student, x, y, targets, temperature=8.0, alpha=0.9, epochs=10, batch_size=64,
                      optimizer=None, seed=0, validation=None, verbose=True, in_place=False):
    """Distill from cached teacher logits `targets` (N, K), one row per sample of x.

    The loss looks up the batch's rows by the indices `minicnn.fit` hands it,
    so the ordinary training loop (progress bar when verbose) does the rest.
    """
    check_hyperparameters(temperature, alpha)
    check_array(targets, "teacher logits", ndim=2)
    if len(targets) != len(x):
        raise ValueError(f"{len(targets)} rows of teacher logits for {len(x)} samples")
    student = student if in_place else student.copy()

    def loss(z, idx):
        return distillation_loss(z, targets[idx], y[idx], temperature, alpha)

    fit(student, x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, seed=seed,
        loss=loss, validation=validation, verbose=verbose)
    return student


def error_rate(model, x, y):
    """Fraction of (x, y) that `model` misclassifies."""
    return 1.0 - evaluate(model, x, y)


def _spread(errors):
    """{"mean_error", "std_error", "errors"}; the std is the sample std (0 for a single run)."""
    errors = [float(e) for e in errors]
    std = float(np.std(errors, ddof=1)) if len(errors) > 1 else 0.0
    return {"mean_error": float(np.mean(errors)), "std_error": std, "errors": errors}


def compare(teacher, build_student, data, seeds=(0, 1, 2), temperature=8.0, alpha=0.9,
            temperatures=(1, 2, 4, 8, 20), epochs=10, batch_size=64, lr=1e-3, verbose=True):
    """The experiment of Hinton et al., section 3: the same student trained from scratch
    on the hard labels and by distillation, with the same seeds and recipe.

    build_student(seed) -> a fresh Sequential; data = (x_train, y_train, x_test, y_test),
    the training images are the transfer set. For every seed: one scratch run
    (cross-entropy), one distilled run per temperature of the sweep (which
    includes `temperature`); each with a fresh Adam(lr), the same initial
    weights and the same batch order. Returns a JSON-able dict of test errors
    (fractions): "teacher" (one model, so its std is 0), "scratch",
    "distilled" (at `temperature`), "temperature_sweep" (a list of
    {"temperature", "mean_error", "std_error", "errors"}), "ratio"
    (distilled / scratch mean error, None if scratch made no error) and "settings".
    """
    check_hyperparameters(temperature, alpha)
    for t in temperatures:
        check_hyperparameters(t, alpha)
    seeds = [check_positive_int(s, "seed", minimum=0) for s in seeds]
    if not seeds:
        raise ValueError("compare needs at least one seed")
    x_train, y_train, x_test, y_test = data
    sweep = sorted({float(t) for t in temperatures} | {float(temperature)})
    targets = teacher_logits(teacher, x_train, build_student(seeds[0]).num_classes)
    scratch, distilled = [], {t: [] for t in sweep}
    runs = tqdm(total=len(seeds) * (1 + len(sweep)), desc="scratch and distilled students",
                unit="run", disable=not verbose)
    for seed in seeds:
        student = build_student(seed)
        fit(student, x_train, y_train, epochs, batch_size, Adam(lr), seed, verbose=False)
        scratch.append(error_rate(student, x_test, y_test))
        runs.update()
        for t in sweep:
            student = learn_from_logits(build_student(seed), x_train, y_train, targets, t, alpha, epochs,
                                        batch_size, Adam(lr), seed, verbose=False, in_place=True)
            distilled[t].append(error_rate(student, x_test, y_test))
            runs.update()
    runs.close()
    result = {
        "teacher": _spread([error_rate(teacher, x_test, y_test)]),
        "scratch": _spread(scratch),
        "distilled": {"temperature": float(temperature), **_spread(distilled[float(temperature)])},
        "temperature_sweep": [{"temperature": t, **_spread(distilled[t])} for t in sweep],
    }
    scratch_mean = result["scratch"]["mean_error"]
    result["ratio"] = result["distilled"]["mean_error"] / scratch_mean if scratch_mean > 0 else None
    result["settings"] = {"seeds": seeds, "temperature": float(temperature), "alpha": float(alpha),
                          "epochs": epochs, "batch_size": batch_size, "lr": lr,
                          "transfer_set": len(x_train), "report_set": len(x_test)}
    return result


def format_comparison(result):
    """The table `compare` results print as: mean +- std of the errors, the ratio, the sweep."""
    runs = len(result["scratch"]["errors"])
    where = result["settings"].get("reported_on", "test")
    lines = [f"\n{where} error over {runs} seeds ({result['settings']['report_set']} images), mean +- std:"]
    for name in ("teacher", "scratch", "distilled"):
        r = result[name]
        lines.append(f"  {name:<10} {r['mean_error']:.4f} +- {r['std_error']:.4f}")
    if result["ratio"] is not None:
        lines.append(f"  distilled / scratch = {result['ratio']:.3f}")
    for r in result["temperature_sweep"]:
        lines.append(f"  distilled at T = {r['temperature']:<5g} {r['mean_error']:.4f} +- {r['std_error']:.4f}")
    if "seconds" in result:
        lines.append(f"compared in {result['seconds']:.0f} s ({result['cpu_seconds']:.0f} s of CPU time)")
    return "\n".join(lines)


def omitted_class(teacher, build_student, data, digit, temperature=8.0, alpha=0.9, epochs=10,
                  batch_size=64, lr=1e-3, seed=0, validation_fraction=0.1, verbose=True):
    """Hinton et al.'s omitted-class experiment, in small: distill with every example of
    class `digit` removed from the transfer set, then ask how well the student
    recognises that class, which it only ever saw as the teacher's soft opinion
    about other digits ("this 8 looks a bit like a 3").

    A student that never gets the class as a target learns a low bias for it;
    the paper raised that bias by hand (choosing the shift on the test set).
    Here the shift is chosen on a validation split of the training images,
    held out of the transfer set, to maximise the validation accuracy over all
    classes; the test set is used only to report. Returns (student with the
    corrected bias, dict of results: test accuracy on `digit` and overall test
    error, before and after the correction, the teacher's, and the shift).
    """
    x_train, y_train, x_test, y_test = data
    num_classes = build_student(seed).num_classes
    if not 0 <= digit < num_classes:
        raise ValueError(f"omitted class must lie in [0, {num_classes}), got {digit}")
    x_fit, y_fit, x_val, y_val = split_validation(x_train, y_train, validation_fraction, seed)
    keep = y_fit != digit
    student = distill(teacher, build_student(seed), x_fit[keep], y_fit[keep], temperature, alpha,
                      epochs, batch_size, Adam(lr), seed, verbose=verbose, in_place=True)
    shift = best_bias_shift(student, x_val, y_val, digit)
    corrected = student.copy()
    output_bias(corrected)[digit] += shift
    is_digit = y_test == digit
    result = {
        "digit": int(digit),
        "transfer_set": int(keep.sum()),
        "omitted": int((~keep).sum()),
        "teacher": _class_report(teacher, x_test, y_test, is_digit),
        "distilled": _class_report(student, x_test, y_test, is_digit),
        "bias_shift": shift,
        "distilled_corrected": _class_report(corrected, x_test, y_test, is_digit),
    }
    return corrected, result


def output_bias(model):
    """The bias vector (K,) of the model's last Dense layer (a view: edits change the model)."""
    for layer in reversed(model.layers):
        if "b" in layer.params:
            return layer.params["b"]
    raise ValueError("the model has no layer with a bias")


BIAS_SHIFTS = np.arange(0.0, 20.25, 0.25)  # the paper's shift for its omitted 3 was 3.5


def best_bias_shift(model, x_val, y_val, digit, shifts=BIAS_SHIFTS):
    """The shift of class `digit`'s output bias, from `shifts`, with the best accuracy on
    (x_val, y_val); the smallest such shift on ties."""
    logits = model.predict(x_val)
    accuracies = []
    for shift in shifts:
        shifted = logits.copy()
        shifted[:, digit] += shift
        accuracies.append(float((shifted.argmax(axis=1) == y_val).mean()))
    return float(shifts[int(np.argmax(accuracies))])


def format_omitted_class(result):
    """The lines `omitted_class` results print as."""
    d = result["digit"]
    lines = [f"transfer set: {result['transfer_set']} images, {result['omitted']} {d}s left out"]
    for name in ("teacher", "distilled", "distilled_corrected"):
        r = result[name]
        lines.append(f"  {name:<20} accuracy on the test {d}s {r['class_accuracy']:.4f}, "
                     f"test error {r['test_error']:.4f}")
    lines.append(f"  bias shift of class {d}, chosen on the validation split: {result['bias_shift']:+.2f}")
    return "\n".join(lines)


def _class_report(model, x, y, is_class):
    predicted = model.predict(x).argmax(axis=1)
    return {"class_accuracy": float((predicted[is_class] == y[is_class]).mean()),
            "test_error": float((predicted != y).mean())}
