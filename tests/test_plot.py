"""fastopt.plot: traces of schedules and the lr_curve figure."""

import struct
import sys

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as L
from fastopt import schedules as S
from fastopt.plot import lr_curve, lr_trace


def png_size(path):
    """(width, height) of a PNG file, after checking it decodes as a whole."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert head[12:16] == b"IHDR"
    size = struct.unpack(">II", head[16:24])
    try:
        from PIL import Image  # matplotlib depends on pillow
    except ImportError:
        return size
    with Image.open(path) as im:
        im.verify()  # every chunk and its CRC
    with Image.open(path) as im:
        im.load()  # the pixel data decompresses
        assert im.size == size
    return size


def sgd(groups=1, lr=0.1):
    return fastopt.SGD(
        [{"params": [fastopt.Parameter(np.zeros(2))], "lr": lr * (g + 1)} for g in range(groups)],
        lr=lr, momentum=0.9)


# ------------------------------------------------------------------ traces (no matplotlib)


def test_trace_of_a_schedule_function():
    s = S.exponential_decay(1.0, 2, 0.5)
    tr = lr_trace(s, 5)
    assert tr["lr"] == [[v] for v in s.values(5)]
    assert tr["momentum"] is None
    assert lr_trace(lambda t: 0.5 * t, 3)["lr"] == [[0.0], [0.5], [1.0]]


def test_trace_equals_stepping_and_restores_the_scheduler():
    opt = sgd(groups=2)
    sched = L.CyclicLR(opt, 0.01, [0.1, 0.2], step_size_up=3)
    opt.step()
    sched.step()
    state, groups = sched.state_dict(), [dict(g) for g in opt.param_groups]
    tr = lr_trace(sched, 12)
    assert sched.state_dict() == state
    assert [dict(g) for g in opt.param_groups] == groups
    stepped, moms = [], []
    for _ in range(12):
        stepped.append(sched.get_last_lr())
        moms.append([g["momentum"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert tr["lr"] == stepped
    assert tr["momentum"] == moms


def test_trace_restores_even_when_the_scheduler_raises():
    opt = sgd()
    sched = L.OneCycleLR(opt, 0.1, total_steps=5)
    before = sched.state_dict()
    with pytest.raises(ValueError, match="Tried to step"):
        lr_trace(sched, 10)
    assert sched.state_dict() == before
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]


def test_trace_reduce_on_plateau_needs_metrics():
    opt = sgd()
    sched = L.ReduceLROnPlateau(opt, patience=0)
    with pytest.raises(TypeError, match="metrics"):
        lr_trace(sched, 3)
    with pytest.raises(ValueError, match="metrics"):
        lr_trace(sched, 5, metrics=[1.0])
    tr = lr_trace(sched, 4, metrics=[1.0, 1.0, 1.0])
    assert [row[0] for row in tr["lr"]] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert sched.num_bad_epochs == 0 and sched.get_last_lr() == [0.1]


def test_trace_bad_input():
    with pytest.raises(ValueError, match="steps"):
        lr_trace(S.constant(1.0), 0)
    with pytest.raises(TypeError, match="scheduler"):
        lr_trace(0.1, 3)


# ------------------------------------------------------------------ figures

try:
    import matplotlib  # noqa: F401
except ImportError:
    HAVE_MPL = False
else:
    HAVE_MPL = True
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="lr_curve needs the plot extra (matplotlib)")


@needs_mpl
@pytest.mark.parametrize("size", [(800, 500), (640, 480), (333, 222)])
def test_lr_curve_png_of_requested_size(tmp_path, size):
    path = tmp_path / "lr.png"
    opt = sgd()
    fig = lr_curve(L.OneCycleLR(opt, 0.1, total_steps=50), S.cosine_decay(0.1, 50),
                   steps=50, path=path, width=size[0], height=size[1])
    assert png_size(path) == size
    assert fig.get_size_inches() * fig.dpi == pytest.approx(size)


@needs_mpl
def test_lr_curve_lines_labels_and_momentum_panel():
    opt = sgd(groups=2)
    fig = lr_curve([L.CyclicLR(opt, 0.01, 0.1, 4), S.linear_warmup(0.1, 10)], steps=30,
                   labels=["cyclic", "warmup"])
    lr_ax, mom_ax = fig.axes
    labels = [line.get_label() for line in lr_ax.get_lines()]
    assert labels == ["cyclic [group 0]", "cyclic [group 1]", "warmup"]
    assert len(mom_ax.get_lines()) == 2
    ys = lr_ax.get_lines()[2].get_ydata()
    assert list(ys) == S.linear_warmup(0.1, 10).values(30)
    no_mom = lr_curve(S.constant(1.0), steps=3, momentum=False)
    assert len(no_mom.axes) == 1


@needs_mpl
def test_lr_curve_into_given_axes(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    out = lr_curve(S.constant(0.5), S.exponential_decay(0.5, 3, 0.1), steps=10, ax=ax, logy=True)
    assert out is fig and len(ax.get_lines()) == 2 and ax.get_yscale() == "log"


@needs_mpl
def test_lr_curve_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        lr_curve(S.constant(1.0), steps=3, labels=["a", "b"])
    with pytest.raises(ValueError, match="width"):
        lr_curve(S.constant(1.0), steps=3, width=0)
    with pytest.raises(TypeError, match="at least one"):
        lr_curve(steps=3)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "fastopt\[plot\]"'):
        lr_curve(S.constant(1.0), steps=3)
    # traces still work without matplotlib
    assert lr_trace(S.constant(1.0), 2)["lr"] == [[1.0], [1.0]]
