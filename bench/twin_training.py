"""Train a zoo network in minicnn and in PyTorch from the same initial weights, on the
same batches in the same order, and compare the test accuracies seed by seed.

An accuracy target set from PyTorch runs ("a correct implementation lands in the
same place") mixes two things: the implementation and the luck of the draw (the
initial weights, the batch order). Here the draw is shared: both sides start from
minicnn's initial weights for the seed and see the batches `minicnn.fit` makes
for it, so what differs is only the implementation (and float rounding, which
grows over 10 epochs). Recipe: Adam lr 1e-3, batch 64, mean cross-entropy.

    python bench/twin_training.py --model seed_cnn --seeds 0 1 2 [--epochs 10]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_substrate import Torch  # noqa: E402
from minicnn import Adam, datasets, evaluate, fit, zoo  # noqa: E402


def torch_fit(torch_side, net, x, y, epochs, batch_size, seed):
    """minicnn.fit's loop in PyTorch: the same seeded permutation per epoch."""
    torch, F = torch_side.torch, torch_side.F
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
            opt.step()
    return net


def torch_accuracy(torch_side, net, x, y):
    with torch_side.torch.inference_mode():
        logits = net.eval()(torch_side.torch.from_numpy(x)).numpy()
    return float((logits.argmax(axis=1) == y).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed_cnn", choices=["seed_cnn", "lenet5"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = datasets.load("mnist10k")
    torch_side = Torch(threads=2)
    print(f"{args.model}, {args.epochs} epochs, Adam 1e-3, batch 64, mnist10k; PyTorch {torch_side.version}")
    print(f"{'seed':>4}  {'minicnn':>8}  {'torch':>8}")
    ours, theirs = [], []
    for seed in args.seeds:
        model = zoo.build(args.model, seed=seed)
        net = torch_side.build(args.model)
        torch_side.copy_weights(model, net)  # the same initial weights
        fit(model, x_train, y_train, epochs=args.epochs, batch_size=64, optimizer=Adam(1e-3), seed=seed, verbose=False)
        torch_fit(torch_side, net, x_train, y_train, args.epochs, 64, seed)
        ours.append(evaluate(model, x_test, y_test))
        theirs.append(torch_accuracy(torch_side, net, x_test, y_test))
        print(f"{seed:>4}  {ours[-1]:>8.2%}  {theirs[-1]:>8.2%}", flush=True)
    print(f"mean  {np.mean(ours):>8.2%}  {np.mean(theirs):>8.2%}")


if __name__ == "__main__":
    main()
