"""Knowledge distillation: the loss, its gradient, the T^2 scaling, bad input, short runs."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from optim.app.cli import main
from minicnn.losses import softmax
from optim.distillation import best_bias_shift, distill, distillation_loss, omitted_class, output_bias
from gradcheck import NOISE_SCALE, numerical_gradient, relative_error

temperatures = st.floats(0.1, 50)
alphas = st.floats(0, 1)


def random_case(seed, n, k, scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)) * scale, rng.standard_normal((n, k)) * scale, rng.integers(0, k, n)


@given(st.integers(1, 5), st.integers(2, 6), temperatures, alphas, st.integers(0, 10**6))
def test_gradient_is_numerical(n, k, temperature, alpha, seed):
    s, t, y = random_case(seed, n, k)
    loss, grad = distillation_loss(s, t, y, temperature, alpha)
    num = numerical_gradient(lambda: np.array(distillation_loss(s, t, y, temperature, alpha)[0]),
                             s, np.array(1.0))
    err = relative_error(grad, num)
    # A central difference of a loss L carries ~eps |L| / h of rounding, and the T^2 term makes
    # |L| ~ 10^3 at T = 50: 2e-7 of absolute noise, 1e-6 of a gradient of 0.06.
    rounding = 8 * np.finfo(np.float64).eps * abs(loss) / 1e-6 / max(np.abs(grad).max(), NOISE_SCALE)
    assert err < 1e-6 + rounding, \
        f"T={temperature}, alpha={alpha}: relative error {err:.2e}\nours {grad}\nnumerical {num}"


def test_hand_computed_case():
    # K = 2, T = 2, alpha = 1/2, one sample: t = (0, 0) gives p = (1/2, 1/2);
    # s = (2 ln 3, 0) gives q = softmax(s / 2) = (3/4, 1/4), softmax(s) = (9/10, 1/10).
    s = np.array([[2 * np.log(3), 0.0]])
    t = np.zeros((1, 2))
    loss, grad = distillation_loss(s, t, np.array([1]), temperature=2.0, alpha=0.5)
    kl = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    ce = -np.log(0.1)
    assert loss == pytest.approx(0.5 * 4 * kl + 0.5 * ce)
    expected = 0.5 * 2 * np.array([0.75 - 0.5, 0.25 - 0.5]) + 0.5 * np.array([0.9, 0.1 - 1])
    np.testing.assert_allclose(grad, [expected], rtol=1e-12)


def test_gradient_is_a_mean_over_the_batch():
    s, t, y = random_case(1, 4, 5)
    loss, grad = distillation_loss(s, t, y, 3.0, 0.7)
    loss2, grad2 = distillation_loss(np.tile(s, (2, 1)), np.tile(t, (2, 1)), np.tile(y, 2), 3.0, 0.7)
    assert loss2 == pytest.approx(loss)
    np.testing.assert_allclose(grad2, np.tile(grad, (2, 1)) / 2, rtol=1e-12)


@given(st.integers(1, 5), st.integers(2, 6), temperatures, st.integers(0, 10**6))
def test_zero_loss_when_the_student_copies_the_teacher(n, k, temperature, seed):
    s, _, y = random_case(seed, n, k)
    loss, grad = distillation_loss(s, s.copy(), y, temperature, alpha=1.0)
    assert abs(loss) < 1e-12, f"loss {loss} for identical logits"
    np.testing.assert_allclose(grad, 0, atol=1e-15)


@given(st.integers(0, 10**6))
def test_alpha_zero_is_plain_cross_entropy(seed):
    s, t, y = random_case(seed, 3, 4)
    loss, grad = distillation_loss(s, t, y, 5.0, alpha=0.0)
    ce, dce = minicnn.losses.cross_entropy(s, y)
    assert loss == pytest.approx(ce)
    np.testing.assert_allclose(grad, dce, rtol=1e-12)


@pytest.mark.parametrize("temperature", [200.0, 2000.0, 20000.0])
def test_high_temperature_limit_is_logit_matching(temperature):
    # With zero-mean logits, T^2 * dKL/ds -> (s - t) / K as T grows (Hinton et al., section 2.1),
    # with an error of order 1/T: the soft term's gradient does not fade with T.
    n, k = 4, 10
    s, t, y = random_case(7, n, k)
    s -= s.mean(axis=1, keepdims=True)
    t -= t.mean(axis=1, keepdims=True)
    _, grad = distillation_loss(s, t, y, temperature, alpha=1.0)
    limit = (s - t) / (k * n)
    err = relative_error(grad, limit)
    assert err < 20 / temperature, f"T={temperature}: relative error {err:.2e} from (s - t) / K"


def test_soft_gradient_magnitude_does_not_depend_on_temperature():
    s, t, y = random_case(3, 8, 10, scale=1.0)
    norms = [np.linalg.norm(distillation_loss(s, t, y, T, 1.0)[1]) for T in (10.0, 100.0, 1000.0)]
    np.testing.assert_allclose(norms, norms[-1], rtol=0.1)
    # Without the T^2 factor the same gradients would differ by a factor 10^4.


@pytest.mark.parametrize("temperature", [0.5, 1.0, 20.0])
def test_huge_logits_stay_finite(temperature):
    # float32 logits of 1e30: exp(1e30 / T) overflows unless the row maximum is subtracted first.
    s = np.array([[1e30, -1e30, 0.0], [0.0, 1e30, -1e30]], dtype=np.float32)
    t = np.array([[-1e30, 1e30, 0.0], [1e30, 0.0, 0.0]], dtype=np.float32)
    assert np.isfinite(softmax(s, temperature)).all()
    loss, grad = distillation_loss(s, t, np.array([0, 1]), temperature, 0.5)
    assert np.isfinite(loss), f"loss {loss}"
    assert np.isfinite(grad).all() and grad.dtype == np.float32


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -2.0}, "temperature"),
    ({"temperature": np.inf}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"alpha": np.nan}, "alpha"),
    ({"t": np.zeros((2, 4))}, "same classes"),
    ({"s": np.array([[0.0, np.nan, 1.0], [0, 0, 0]])}, "non-finite"),
    ({"t": np.array([[0.0, np.inf, 1.0], [0, 0, 0]])}, "non-finite"),
    ({"y": np.array([0, 3])}, r"\[0, 3\)"),
])
def test_bad_input(kwargs, message):
    args = {"s": np.zeros((2, 3)), "t": np.zeros((2, 3)), "y": np.array([0, 1]),
            "temperature": 2.0, "alpha": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        distillation_loss(args["s"], args["t"], args["y"], args["temperature"], args["alpha"])


def weights(model):
    return sum(p.size for layer in model.layers for p in layer.params.values())


@pytest.mark.parametrize("name", ["small_cnn", "small_mlp"])
def test_students_have_at_most_a_tenth_of_lenet5s_weights(name):
    student, teacher = minicnn.zoo.build(name, seed=0), minicnn.zoo.lenet5(seed=0)
    assert weights(teacher) == 431_080
    assert weights(student) <= weights(teacher) / 10, f"{name}: {weights(student)} weights"
    assert student.predict(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


@pytest.fixture(scope="module")
def small_data():
    """2,000 training and 500 test images of mnist10k, and a LeNet-300-100 teacher
    trained on them for 3 epochs (a few seconds)."""
    x_train, y_train, x_test, y_test = minicnn.datasets.load("mnist10k")
    data = (x_train[:2000], y_train[:2000], x_test[:500], y_test[:500])
    teacher = minicnn.zoo.lenet300(seed=0)
    minicnn.fit(teacher, data[0], data[1], epochs=3, batch_size=32, seed=0, verbose=False)
    return teacher, data


def test_distill_trains_a_copy_of_the_student(small_data):
    teacher, (x, y, x_test, y_test) = small_data
    fresh = minicnn.zoo.small_mlp(seed=0)
    before = [p.copy() for layer in fresh.layers for p in layer.params.values()]
    teacher_before = teacher.predict(x_test)
    student = distill(teacher, fresh, x, y, temperature=4.0, alpha=0.9, epochs=3, batch_size=32,
                      verbose=False)
    assert all(np.array_equal(a, p) for a, p in
               zip(before, (p for layer in fresh.layers for p in layer.params.values()))), "student modified"
    np.testing.assert_array_equal(teacher.predict(x_test), teacher_before)
    accuracy = minicnn.evaluate(student, x_test, y_test)
    assert accuracy > 0.8, f"distilled student accuracy {accuracy}"


def test_distill_from_a_teacher_with_other_classes_fails(small_data):
    teacher, (x, y, _, _) = small_data
    student = minicnn.Sequential([minicnn.Flatten(), minicnn.Dense(784, 5)])
    with pytest.raises(ValueError, match="5 classes"):
        distill(teacher, student, x[:10], y[:10] % 5, epochs=1, verbose=False)


def test_omitted_class_is_learned_from_soft_targets_only(small_data):
    teacher, data = small_data
    results = {}
    for alpha in (0.0, 0.9):
        student, results[alpha] = omitted_class(teacher, minicnn.zoo.small_mlp, data, digit=3, temperature=8.0,
                                                alpha=alpha, epochs=5, batch_size=32, verbose=False)
    hard, soft = results[0.0], results[0.9]
    assert hard["omitted"] > 0 and hard["transfer_set"] + hard["omitted"] == 1800  # 10% held out
    # Hard labels alone never name a 3; the teacher's soft targets do, on other digits.
    assert hard["distilled"]["class_accuracy"] < 0.05, hard
    assert soft["distilled"]["class_accuracy"] > 0.5, soft
    assert soft["distilled_corrected"]["class_accuracy"] >= soft["distilled"]["class_accuracy"], soft
    shifted = minicnn.evaluate(student, data[2], data[3])
    assert abs(1 - shifted - soft["distilled_corrected"]["test_error"]) < 1e-12


def test_best_bias_shift_hand_computed():
    # Class 2 trails the winner by 1.1 on the two images labelled 2, and on the
    # image labelled 0 it trails by 1.6: the best shift is in (1.1, 1.6), the smallest on the grid 1.25.
    class Fixed:
        def predict(self, x, batch_size=256):
            return np.array([[1.1, 0.0, 0.0], [0.0, 1.1, 0.0], [1.6, 0.0, 0.0]], np.float32)

    assert best_bias_shift(Fixed(), None, np.array([2, 2, 0]), digit=2) == 1.25
    model = minicnn.zoo.small_mlp(seed=0)
    output_bias(model)[4] += 1.0
    assert model.layers[-1].params["b"][4] == output_bias(minicnn.zoo.small_mlp(seed=0))[4] + 1.0


@pytest.fixture(scope="module")
def teacher_file(small_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "lenet300.npz"
    small_data[0].save(path)
    return path


def test_cli_distill_saves_a_loadable_student(teacher_file, tmp_path, capsys):
    out = tmp_path / "student.npz"
    args = ["distill", "--teacher", str(teacher_file), "--student", "small_mlp", "--temperature", "4",
            "--alpha", "0.9", "--epochs", "1", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "before distillation" in text and text.count("Total") == 3, text
    accuracy = float(text.rsplit("test accuracy ", 1)[1].split()[0])
    x, y = minicnn.datasets.load()[2:]
    student = minicnn.load(out)
    assert student.predict(x[:3]).shape == (3, 10)
    assert abs(minicnn.evaluate(student, x, y) - accuracy) <= 5e-5 and accuracy > 0.8


def test_cli_compare_writes_the_json(teacher_file, tmp_path, capsys):
    path = tmp_path / "compare.json"
    args = ["distill", "--teacher", str(teacher_file), "--student", "small_mlp", "--compare", "--seeds", "2",
            "--temperature", "2", "--temperatures", "1,2", "--epochs", "1", "--json", str(path)]
    assert main(args) == 0
    result = json.loads(path.read_text())
    for name in ("teacher", "scratch", "distilled"):
        assert 0 <= result[name]["mean_error"] <= 1 and result[name]["std_error"] >= 0
    assert len(result["scratch"]["errors"]) == len(result["distilled"]["errors"]) == 2
    assert [r["temperature"] for r in result["temperature_sweep"]] == [1.0, 2.0]
    assert result["distilled"]["errors"] == result["temperature_sweep"][1]["errors"]
    assert "distilled / scratch" in capsys.readouterr().out


def test_cli_omit_class(teacher_file, capsys):
    args = ["distill", "--teacher", str(teacher_file), "--omit-class", "7", "--epochs", "1"]
    assert main(args) == 0
    assert "accuracy on the test 7s" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "0"], "temperature"),
    (["--alpha", "2"], "alpha"),
    (["--omit-class", "10"], "omitted class"),
])
def test_cli_bad_input(teacher_file, capsys, flags, message):
    assert main(["distill", "--teacher", str(teacher_file), "--epochs", "1", *flags]) == 2
    assert message in capsys.readouterr().err
