"""Every example in examples/ runs in its quick mode and delivers what it claims."""
import importlib.util
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path):
    """(width, height) of a PNG, after checking the signature and decoding it fully."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # not a blank canvas
    return width, height


needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib (the plot extra) is not installed")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="scikit-learn provides the digits data set")


# ------------------------------------------------------------------------ trajectories


@needs_matplotlib
def test_trajectories(tmp_path, capsys):
    ex = load("trajectories")
    out = ex.main(["--quick", "--out", str(tmp_path)])
    res = out["results"]
    assert set(res) == {"f1", "f2"}
    assert list(res["f1"]) == ["SGD", "Momentum", "Nesterov", "Adagrad", "RMSprop", "Adam"]
    for prob, paths in res.items():
        start = ex.value(prob, np.array(ex.PROBLEMS[prob]["start"]))
        for name, (path, sec) in paths.items():
            assert path.shape == (31, 2)
            np.testing.assert_array_equal(path[0], ex.PROBLEMS[prob]["start"])
            # every method makes progress: at least 10x lower than the start
            assert ex.value(prob, path[-1]) < start / 10, (prob, name)
            assert sec > 0
    # plain SGD bounces across the steep y valley on f1: y changes sign on every step
    y = res["f1"]["SGD"][0][:, 1]
    assert np.all(np.sign(y[1:]) != np.sign(y[:-1]))
    # the per-coordinate methods undo the conditioning: lower than SGD and momentum
    final = {n: ex.value("f1", p[-1]) for n, (p, _) in res["f1"].items()}
    for adaptive in ("Adagrad", "RMSprop"):
        assert final[adaptive] < min(final["SGD"], final["Momentum"]) / 10
    # Nesterov's look-ahead damps momentum's overshoot on f1
    assert final["Nesterov"] < final["Momentum"]
    names = [os.path.basename(f) for f in out["files"]]
    assert names == ["trajectories_f1.png", "trajectories_f2.png", "trajectories_3d.png"]
    for f in out["files"]:
        assert png_size(f) == (900, 540)
    printed = capsys.readouterr().out
    assert "final f1" in printed and "Nesterov" in printed


@needs_matplotlib
def test_trajectory_pictures_name_the_hyperparameters():
    ex = load("trajectories")
    results = ex.run_all(5)
    figs = ex.figures(results, size=(900, 540))
    assert list(figs) == ["trajectories_f1.png", "trajectories_f2.png", "trajectories_3d.png"]
    # one f1 panel per optimizer, titled with its name and every argument it runs with
    titles = [ax.get_title() for ax in figs["trajectories_f1.png"].axes]
    assert [t.split("\n")[0] for t in titles] == [ex.describe(n, "f1") for n in ex.OPTIMIZERS]
    assert titles[0].startswith("SGD (lr=0.95)\nf = ")
    assert ex.describe("Momentum", "f2") == "Momentum (lr=0.05, momentum=0.9)"
    assert ex.describe("Adam", "f1") == "Adam (lr=0.3)"
    # f2: every optimizer in the legend with its learning rate, each in its own style
    ax = figs["trajectories_f2.png"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [lab.split(":")[0] for lab in labels] == [ex.describe(n, "f2") for n in ex.OPTIMIZERS]
    lines = [line for line in ax.get_lines() if line.get_label() in labels]
    styles = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(styles) == len(ex.OPTIMIZERS)
    # 3-D: one 3-D panel per optimizer (paths on one shared surface hid each other) and
    # the f-per-step panel with the hyperparameters in its legend
    axes = figs["trajectories_3d.png"].axes
    assert [a.name for a in axes] == ["3d"] * len(ex.OPTIMIZERS) + ["rectilinear"]
    assert [a.get_title() for a in axes[:-1]] == [ex.describe(n, "f1") for n in ex.OPTIMIZERS]
    assert [t.get_text() for t in axes[-1].get_legend().get_texts()] == [
        ex.describe(n, "f1") for n in ex.OPTIMIZERS]
    for a, (name, (path, _)) in zip(axes[:-1], results["f1"].items()):
        drawn = a.get_lines()[-1].get_data_3d()
        np.testing.assert_array_equal(drawn[0], path[:, 0], err_msg=name)
        np.testing.assert_array_equal(drawn[2], ex.value("f1", path), err_msg=name)


def test_trajectories_table_without_plots(capsys):
    ex = load("trajectories")
    out = ex.main(["--no-plot", "--steps", "5"])
    assert out["files"] == []
    assert out["results"]["f2"]["Adam"][0].shape == (6, 2)
    assert "us/step" in capsys.readouterr().out


# ------------------------------------------------------------------------ linear fit


@needs_matplotlib
def test_linear_fit(tmp_path, capsys):
    ex = load("linear_fit")
    out = ex.main(["--quick", "--out", str(tmp_path)])
    res = out["results"]
    assert list(res) == ["SGD", "Momentum", "Nesterov", "Adagrad", "RMSprop", "Adam"]
    for name, r in res.items():
        assert r["iter_loss"].shape == (30 * 16,)  # 1000 samples / batch 64 -> 16 batches
        assert r["epoch_loss"].shape == (30,)
        # the loss comes down to the noise floor and the weights to the truth
        assert r["epoch_loss"][-1] < r["epoch_loss"][0] / 5, name
        assert r["epoch_loss"][-1] < 1.3 * ex.NOISE ** 2, name
        assert r["iter_loss"][-16:].mean() < r["iter_loss"][:16].mean() / 10, name
        np.testing.assert_allclose(r["w"], ex.TRUE_W, atol=0.05, err_msg=name)
        assert abs(r["b"] - ex.TRUE_B) < 0.05, name
    assert [os.path.basename(f) for f in out["files"]] == ["linear_fit.png"]
    assert png_size(out["files"][0]) == (900, 360)
    assert "us/step" in capsys.readouterr().out


@needs_matplotlib
def test_linear_fit_legend_names_the_hyperparameters():
    ex = load("linear_fit")
    assert ex.describe("Nesterov") == "Nesterov (lr=0.05, momentum=0.9)"
    assert ex.describe("RMSprop") == "RMSprop (lr=0.01)"
    fig = ex.figure(ex.run_all(epochs=2), size=(900, 360))
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == [ex.describe(n) for n in ex.OPTIMIZERS] + ["noise variance"]


# ------------------------------------------------------------------------ digits MLPs


@needs_sklearn
def test_digits_mlp_reaches_95_percent(capsys):
    ex = load("digits_mlp")
    out = ex.main(["--quick"])
    assert out["test_acc"] >= 0.95
    hist = out["history"]
    assert len(hist) == 6
    assert hist[-1]["loss"] < hist[0]["loss"] / 10
    assert out["seconds"] < 30  # "a few seconds" (about 0.3 s here), loosely for slow CI
    printed = capsys.readouterr().out
    assert "test acc" in printed.splitlines()[0]
    # not a terminal: no progress frames, only the table
    assert "\r" not in printed and "#" not in printed
    assert len(printed.splitlines()) == 1 + 6 + 1
    assert "test accuracy" in printed.splitlines()[-1]


@needs_sklearn
def test_digits_mlp_draws_its_progress_bar_on_a_terminal():
    import pty

    ex = load("digits_mlp")
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert tty.isatty()
            ex.train(epochs=1, out=tty)
        os.set_blocking(master, False)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        os.close(slave)
    shown = b"".join(chunks).decode()
    assert "\r  [" + "#" * 30 + "]" in shown  # redrawn in place, up to the end
    assert "test acc" in shown


@needs_sklearn
def test_digits_backward_matches_finite_differences():
    ex = load("digits_mlp")
    Xtr, ytr, _, _ = ex.load_data()
    params = [ex.fastopt.Parameter(p.astype(np.float64)) for p in ex.init_params(3)]
    X, y = Xtr[:16].astype(np.float64), ytr[:16]
    _, grads = ex.loss_and_grads(params, X, y)
    rng = np.random.default_rng(0)
    for p, g in zip(params, grads):
        for _ in range(3):
            i = tuple(rng.integers(0, s) for s in p.shape)
            old = p[i]
            p[i] = old + 1e-6
            up = ex.loss_and_grads(params, X, y)[0]
            p[i] = old - 1e-6
            down = ex.loss_and_grads(params, X, y)[0]
            p[i] = old
            assert abs((up - down) / 2e-6 - g[i]) < 1e-5


@needs_sklearn
def test_autograd_mlp():
    pytest.importorskip("autograd", reason="the autograd example needs the autograd package")
    ex = load("autograd_mlp")
    out = ex.main(["--quick"])
    assert out["grad_check"] < 1e-5
    assert out["test_acc"] >= 0.95


@needs_sklearn
def test_digits_example_runs_as_a_script():
    cmd = [sys.executable, os.path.join(EXAMPLES, "digits_mlp.py"), "--quick"]
    r = subprocess.run(cmd, check=False, capture_output=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr.decode()
    assert b"\r" not in r.stdout  # a pipe gets no progress frames (bytes: text mode maps \r)
    last = r.stdout.decode().strip().splitlines()[-1]
    assert last.startswith("test accuracy ")
    assert float(last.split()[2].rstrip("%")) >= 95.0
