"""The digits MLP of ``digits_mlp.py`` with gradients from HIPS autograd instead of by hand.

Only the gradient source changes: the loss is written once with ``autograd.numpy`` and
``autograd.value_and_grad`` differentiates it with respect to the list of weights. The data,
network, fastopt Adam and OneCycleLR schedule are those of ``digits_mlp.py``, and before
training the autograd gradients are checked against the hand-written backward pass.

    pip install autograd
    python examples/autograd_mlp.py [--epochs N] [--quick] [--seed S]
"""
import argparse
import os
import sys

import numpy as np

# the sibling example provides the data, the network and the training loop
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_mlp


def _loss(weights, X, y):
    import autograd.numpy as anp

    W1, b1, W2, b2 = weights
    h = anp.maximum(anp.dot(X, W1) + b1, 0.0)
    logits = anp.dot(h, W2) + b2
    shifted = logits - anp.max(logits, axis=1, keepdims=True)
    logp = shifted - anp.log(anp.sum(anp.exp(shifted), axis=1, keepdims=True))
    return -anp.mean(logp[np.arange(len(y)), y])


def make_grad_fn():
    """``(params, X, y) -> (loss, [grads])`` computed by autograd."""
    from autograd import value_and_grad

    vg = value_and_grad(_loss)

    def grad_fn(params, X, y):
        # autograd traces plain ndarrays: hand it views of the Parameters' memory
        loss, grads = vg([p.data for p in params], X, y)
        return float(loss), grads

    return grad_fn


def check_against_handwritten(grad_fn, seed=0, n=64):
    """Largest relative difference between autograd's and the hand-written gradients."""
    Xtr, ytr, _, _ = digits_mlp.load_data(seed)
    params = digits_mlp.init_params(seed)
    X, y = Xtr[:n], ytr[:n]
    la, ga = grad_fn(params, X, y)
    lh, gh = digits_mlp.loss_and_grads(params, X, y)
    worst = abs(la - lh) / abs(lh)
    for a, h in zip(ga, gh):
        worst = max(worst, float(np.max(np.abs(a - h)) / (np.max(np.abs(h)) + 1e-30)))
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="fewer epochs (for CI)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    grad_fn = make_grad_fn()
    diff = check_against_handwritten(grad_fn, args.seed)
    print(f"autograd vs hand-written gradients: max relative difference {diff:.1e}")
    epochs = min(args.epochs, 6) if args.quick else args.epochs
    result = digits_mlp.train(grad_fn, epochs=epochs, seed=args.seed)
    print(f"test accuracy {result['test_acc']:.2%} after {epochs} epochs "
          f"in {result['seconds']:.1f} s (gradients from autograd)")
    result["grad_check"] = diff
    return result


if __name__ == "__main__":
    main()
