"""Training with compressed optimizer state and 16-bit parameters against float32 Adam.

    python benchmarks/quality_low_precision.py [--task digits|lm|both] [--steps 300]
                                               [--seeds 0,1,2,3,4] [--json FILE]

Two tasks, each trained from the same seed in every configuration:

* ``digits``: the NumPy MLP of ``examples/digits_mlp.py`` (scikit-learn's 8x8 digits,
  64 -> 128 -> 10, batch 32, fastopt.Adam with weight decay 1e-4 under OneCycleLR, 12 epochs)
  with fastopt's NumPy optimizer; reported: the training loss of the last epoch, the test
  loss and the test accuracy, averaged over the seeds (``--seeds``, default 0 to 4). Only
  ``W1`` (8192 elements) reaches the default ``min_8bit_size`` of 4096, so the 8-bit state
  also runs with ``min_8bit_size=1`` (every tensor 8-bit).
* ``lm``: a character-level causal transformer in torch (2 pre-norm layers, d = 64, 4
  heads, context 64, batch 32, about 0.1 M parameters) trained with fastopt.torch.AdamW (lr
  3e-3 with 30 warm-up steps and a cosine decay to a tenth, weight decay 0.01) for
  ``--steps`` steps on text that Python ships: the docstrings of a fixed list of standard
  library modules (their first 90% for training, the rest for validation); reported: the
  training loss averaged over the last 50 steps and the validation loss at the end (16
  fixed batches), torch and fastopt on one thread (so that no threads spin against a busy
  machine). The text depends on the Python version; every
  configuration reads the same.

Configurations: float32 Adam; bfloat16 state (``state_dtype="bfloat16"``); 8-bit block-wise
state (``state_dtype="int8"``); bfloat16 parameters with bfloat16 gradients and the forward
pass on the bfloat16 values, stepped plainly (state in bfloat16, updates rounded to nearest),
with ``master_weights=True`` (float32 master copy and state) and with
``stochastic_rounding=True``. A configuration that this fastopt lacks (no ``state_dtype``,
``master_weights`` or ``stochastic_rounding``) is listed as not available. The script prints
one Markdown table per task, with each loss's change against float32 Adam, and whether the
8-bit and bfloat16 runs end within 2% of float32's loss.
"""
import argparse
import ast
import importlib
import inspect
import json
import math
import sys
import time

import numpy as np

import fastopt

#: name -> (parameter dtype, optimizer keyword arguments); the second float32 run differs in
#: its seed alone (every seed + 100): its row shows how far two float32 runs end apart
CONFIGS = {
    "fp32 Adam": ("float32", {}),
    "fp32 Adam, other seeds": ("float32", {}),
    "bf16 state": ("float32", {"state_dtype": "bfloat16"}),
    "8-bit state": ("float32", {"state_dtype": "int8"}),
    "8-bit state, every tensor": ("float32", {"state_dtype": "int8", "min_8bit_size": 1}),
    "bf16 params": ("bfloat16", {}),
    "bf16 params + master weights": ("bfloat16", {"master_weights": True}),
    "bf16 params + stochastic rounding": ("bfloat16", {"stochastic_rounding": True}),
}
#: how far above float32 Adam's loss a run may end, relative (the claim the script checks)
TOLERANCE = 0.02

#: the standard library modules whose docstrings make the language model's text
TEXT_MODULES = ("argparse", "collections", "functools", "json", "textwrap", "string", "random",
                "statistics", "pathlib", "dataclasses", "heapq", "bisect", "fractions",
                "shutil", "tempfile", "subprocess", "logging", "inspect", "ast", "enum",
                "typing", "datetime", "calendar", "csv", "configparser", "contextlib", "abc",
                "copy", "pprint", "difflib", "zipfile", "tarfile", "unittest", "doctest",
                "pickle", "threading", "queue", "socket", "email", "http.client")


# ---- what this fastopt supports ---------------------------------------------------------------

def _bf16_numpy():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def numpy_supports(kwargs):
    """Whether fastopt.Adam takes these keyword arguments (tried on a tiny parameter)."""
    p = fastopt.Parameter(np.zeros(4, np.float32))
    try:
        fastopt.Adam([p], **kwargs)
    except TypeError:
        return False
    return True


def torch_supports(kwargs):
    """Whether fastopt.torch.AdamW takes these keyword arguments."""
    import torch

    import fastopt.torch as ft
    try:
        ft.AdamW([torch.zeros(4, requires_grad=True)], **kwargs)
    except TypeError:
        return False
    return True


# ---- the digits MLP ---------------------------------------------------------------------------

def train_digits(dtype_name, kwargs, seed, epochs=12, batch=32, max_lr=0.01):
    """The digits MLP with fastopt.Adam; returns last-epoch train loss, test loss and accuracy."""
    from fastopt.examples import digits_mlp as dm
    from fastopt.lr_scheduler import OneCycleLR

    Xtr, ytr, Xte, yte = dm.load_data(seed)
    params = dm.init_params(seed)
    dtype = np.float32 if dtype_name == "float32" else _bf16_numpy()
    if dtype is not np.float32:
        params = [fastopt.Parameter(np.asarray(p).astype(dtype)) for p in params]
    opt = fastopt.Adam(params, lr=max_lr, weight_decay=1e-4, **kwargs)
    n_batches = -(-len(ytr) // batch)
    sched = OneCycleLR(opt, max_lr=max_lr, epochs=epochs, steps_per_epoch=n_batches)
    rng = np.random.default_rng(seed + 1)

    def values():  # the forward pass reads the parameters' values in float32
        return [np.asarray(p, dtype=np.float32) for p in params]

    total = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(ytr))
        total = 0.0
        for k in range(n_batches):
            idx = order[k * batch:(k + 1) * batch]
            loss, grads = dm.loss_and_grads(values(), Xtr[idx], ytr[idx])
            for p, g in zip(params, grads):
                p.grad = np.asarray(g, dtype=np.float32).astype(dtype)
            opt.step()
            sched.step()
            total += loss * len(idx)
    logits, _ = dm.forward(values(), Xte)
    test_loss, _ = dm.softmax_cross_entropy(logits, yte)
    return {"train_loss": total / len(ytr), "test_loss": test_loss,
            "test_acc": float((logits.argmax(axis=1) == yte).mean())}


# ---- the character-level transformer ----------------------------------------------------------

def stdlib_text():
    """The docstrings of ``TEXT_MODULES`` (module, classes, functions, methods), in order."""
    parts = []
    for name in TEXT_MODULES:
        try:
            mod = importlib.import_module(name)
            source = inspect.getsource(mod)
        except (ImportError, OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
    text = "\n\n".join(parts)
    return "".join(ch for ch in text if ch == "\n" or 32 <= ord(ch) < 127)


def _make_model(torch, vocab, d=64, layers=2, heads=4, ctx=64):
    nn = torch.nn

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
                for _ in range(layers))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx),
                                 persistent=False)

        def forward(self, x):
            t = x.shape[1]
            h = self.tok(x) + self.pos(torch.arange(t))
            mask = self.mask[:t, :t].to(h.dtype)
            for block in self.blocks:
                h = block(h, src_mask=mask, is_causal=True)
            return self.head(self.norm(h))

    return TinyLM()


def train_lm(dtype_name, kwargs, seed, steps=300, batch=32, ctx=64, lr=3e-3, warmup=30,
             last=50, text=None, threads=1):
    """The tiny transformer with fastopt.torch.AdamW; returns the train and validation loss."""
    import torch

    import fastopt.torch as ft
    text = stdlib_text() if text is None else text
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    torch.set_num_threads(threads)
    fastopt.set_num_threads(threads)
    torch.manual_seed(seed)
    model = _make_model(torch, len(chars), ctx=ctx)
    dtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
    model.to(dtype)
    opt = ft.AdamW(model.parameters(), lr=lr, weight_decay=0.01, **kwargs)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed + 1)

    def batch_of(source, g):
        starts = torch.randint(0, len(source) - ctx - 1, (batch,), generator=g)
        x = torch.stack([source[s:s + ctx] for s in starts])
        y = torch.stack([source[s + 1:s + ctx + 1] for s in starts])
        return x, y

    def loss_of(x, y):
        logits = model(x).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))

    losses = []
    for _ in range(steps):
        x, y = batch_of(train, gen)
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
    g_val = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        val_loss = statistics_mean(float(loss_of(*batch_of(val, g_val))) for _ in range(16))
    return {"train_loss": statistics_mean(losses[-last:]), "val_loss": val_loss,
            "first_loss": losses[0]}


def statistics_mean(values):
    values = list(values)
    return sum(values) / len(values)


# ---- the report -------------------------------------------------------------------------------

def _available(task, kwargs, dtype_name):
    if task == "digits":
        if dtype_name != "float32" and _bf16_numpy() is None:
            return "needs ml_dtypes"
        return None if numpy_supports(kwargs) else "not in this fastopt"
    return None if torch_supports(kwargs) else "not in this fastopt"


def run_task(task, seeds, steps, log):
    """Every configuration of one task: name -> averaged metrics, or the reason it is missing."""
    results = {}
    text = stdlib_text() if task == "lm" else None
    if text is not None:
        log(f"lm: {len(text)} characters of standard-library docstrings, "
            f"{len(set(text))} distinct")
    for name, (dtype_name, kwargs) in CONFIGS.items():
        if task == "lm" and kwargs.get("min_8bit_size") == 1:
            continue  # every large tensor of the model is 8-bit at the default already
        why = _available(task, kwargs, dtype_name)
        if why:
            results[name] = why
            log(f"{task}: {name}: {why}")
            continue
        t0 = time.perf_counter()
        runs = []
        for seed in seeds:
            seed = seed + 100 if name == "fp32 Adam, other seeds" else seed
            if task == "digits":
                runs.append(train_digits(dtype_name, kwargs, seed))
            else:
                runs.append(train_lm(dtype_name, kwargs, seed, steps=steps, text=text))
        avg = {k: statistics_mean(r[k] for r in runs) for k in runs[0]}
        avg["seconds"] = time.perf_counter() - t0
        results[name] = avg
        log(f"{task}: {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in avg.items()))
    return results


def _change(value, base):
    return f"{100 * (value - base) / base:+.1f}%"


def markdown(task, results, seeds, steps):
    """The Markdown table of one task, and the lines on the 2% claim."""
    base = results.get("fp32 Adam")
    if task == "digits":
        cols = [("train_loss", "train loss (last epoch)"), ("test_loss", "test loss"),
                ("test_acc", "test accuracy")]
        key = "test_loss"
        title = (f"Digits MLP (NumPy, fastopt.Adam, 12 epochs), mean over seeds "
                 f"{', '.join(map(str, seeds))}")
    else:
        cols = [("train_loss", "train loss (last 50 steps)"), ("val_loss", "validation loss")]
        key = "val_loss"
        title = (f"Character-level transformer (torch, fastopt.torch.AdamW, {steps} steps), "
                 f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    lines = [title, "", "| configuration | " + " | ".join(c for _, c in cols)
             + f" | {cols[-2 if task == 'digits' else -1][1]} vs fp32 |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for name, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {name} | " + " | ".join("-" for _ in cols) + f" | {r} |")
            continue
        cells = [f"{r[k]:.2%}" if k == "test_acc" else f"{r[k]:.4f}" for k, _ in cols]
        change = _change(r[key], base[key]) if isinstance(base, dict) else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {change} |")
    verdicts = []
    if isinstance(base, dict):
        for name in [n for n in results if not n.startswith("fp32")]:
            r = results.get(name)
            if isinstance(r, dict):
                rel = (r[key] - base[key]) / base[key]
                ok = rel <= TOLERANCE
                verdicts.append(f"- {name}: {key.replace('_', ' ')} {_change(r[key], base[key])} "
                                f"against fp32: {'within' if ok else 'NOT within'} 2%")
        other = results.get("fp32 Adam, other seeds")
        if isinstance(other, dict):
            verdicts.append(f"- (float32 Adam from other seeds: {_change(other[key], base[key])})")
    return "\n".join(lines), verdicts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["digits", "lm", "both"], default="both")
    ap.add_argument("--steps", type=int, default=300, help="the language model's steps")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds (default 0,...,4 for digits, 0 for lm)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    out = {}
    tasks = ["digits", "lm"] if args.task == "both" else [args.task]
    for task in tasks:
        seeds = ([int(s) for s in args.seeds.split(",")] if args.seeds
                 else ([0, 1, 2, 3, 4] if task == "digits" else [0]))
        results = run_task(task, seeds, args.steps, log)
        table, verdicts = markdown(task, results, seeds, args.steps)
        print(table)
        print()
        if verdicts:
            print("Within 2% of float32 Adam's loss (no more than 2% above it; a lower loss "
                  "counts as within):")
            print("\n".join(verdicts))
            print()
        out[task] = results
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
