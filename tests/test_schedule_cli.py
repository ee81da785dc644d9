"""``python -m fastopt schedule``: table output, PNG output, usage errors (exit code 2)."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _cli
from fastopt import lr_scheduler as L
from fastopt import schedules as S


def main(argv):
    """``python -m fastopt schedule ARGV``, in this process: the exit status."""
    return _cli.main(["schedule", *argv])


def table(out):
    """(header, rows) of the printed table, comments dropped."""
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    header = lines[0].split("\t")
    rows = [[float(x) for x in ln.split("\t")] for ln in lines[1:]]
    return header, rows


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


def reference(make, steps, lr=0.1):
    opt = fastopt.SGD([fastopt.Parameter(np.zeros(1))], lr=lr, momentum=0.9)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_steplr_table_has_exact_values(capsys):
    assert main(["StepLR", "--steps", "40", "--step_size", "7", "--gamma", "0.5"]) == 0
    header, rows = table(capsys.readouterr().out)
    assert header == ["step", "lr"]
    assert [r[0] for r in rows] == list(range(40))
    assert [r[1] for r in rows] == reference(lambda o: L.StepLR(o, 7, 0.5), 40)


def test_lists_lambdas_and_momentum_column(capsys):
    assert main(["MultiStepLR", "--steps", "12", "--milestones", "[3, 8]", "--lr", "1"]) == 0
    _, rows = table(capsys.readouterr().out)
    assert [r[1] for r in rows] == reference(lambda o: L.MultiStepLR(o, [3, 8]), 12, lr=1.0)
    assert main(["lambdalr", "--steps", "5", "--lr_lambda", "lambda e: 0.5 ** e"]) == 0
    _, rows = table(capsys.readouterr().out)
    assert [r[1] for r in rows] == [0.1 * 0.5**e for e in range(5)]
    assert main(["OneCycleLR", "--steps=20", "--max_lr=1.0", "--total_steps=20",
                 "--optimizer", "adam"]) == 0
    header, rows = table(capsys.readouterr().out)
    assert header == ["step", "lr", "momentum"]
    assert rows[0][1:] == [pytest.approx(1.0 / 25, rel=1e-14), 0.95]


def test_schedule_function_and_plateau(capsys):
    args = ["exponential_decay", "--steps", "6", "--initial_lr", "0.1", "--decay_steps", "2",
            "--decay_rate", "0.5", "--staircase", "True"]
    assert main(args) == 0
    _, rows = table(capsys.readouterr().out)
    assert [r[1] for r in rows] == S.exponential_decay(0.1, 2, 0.5, True).values(6)
    assert main(["ReduceLROnPlateau", "--steps", "5", "--patience", "0",
                 "--metrics", "3,2,2"]) == 0
    _, rows = table(capsys.readouterr().out)
    assert [r[1] for r in rows] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])


@pytest.mark.parametrize("size", [(400, 300), (800, 500)])
def test_out_writes_png_of_requested_size(tmp_path, capsys, size):
    pytest.importorskip("matplotlib", reason="--out needs the plot extra")
    path = tmp_path / "lr.png"
    argv = ["CosineAnnealingLR", "--steps", "50", "--T_max", "25", "--out", str(path)]
    if size != (800, 500):
        argv += ["--width", str(size[0]), "--height", str(size[1])]
    assert main(argv) == 0
    assert png_size(path) == size


def test_out_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "lr.png"
    assert main(["StepLR", "--steps", "3", "--step_size", "1", "--out", str(path)]) == 1
    captured = capsys.readouterr()
    assert 'pip install "fastopt[plot]"' in captured.err
    assert not path.exists()
    _, rows = table(captured.out)  # the table is still printed
    assert len(rows) == 3


BAD = [
    (["NoSuchLR", "--steps", "3"], "unknown schedule"),
    (["StepLR", "--steps", "3"], "needs --step_size"),
    (["StepLR", "--steps", "3", "--step_size", "2", "--gama", "0.5"], "--gama"),
    (["StepLR", "--step_size", "2"], "--steps"),
    (["StepLR", "--steps", "0", "--step_size", "2"], "--steps"),
    (["StepLR", "--steps", "x", "--step_size", "2"], "--steps"),
    (["StepLR", "--steps", "3", "--step_size"], "--step_size/--step-size: expected one argument"),
    (["StepLR", "--steps", "3", "--step_size", "2", "--step-size", "3"], "given twice"),
    (["StepLR", "--steps", "3", "--steps", "4", "--step_size", "2"], "--steps given twice"),
    (["StepLR", "--ste", "3", "--step_size", "2"], "--ste"),  # no abbreviations
    (["StepLR", "--steps", "3", "stray"], "unexpected argument"),
    (["ConstantLR", "--steps", "3", "--factor", "2"], "factor"),
    (["OneCycleLR", "--steps", "30", "--max_lr", "1", "--total_steps", "10"], "Tried to step"),
    (["ReduceLROnPlateau", "--steps", "3"], "--metrics"),
    (["LambdaLR", "--steps", "3", "--lr_lambda", "lambda e: e.__class__"], "private"),
    (["StepLR", "--steps", "3", "--step_size", "2", "--optimizer", "lbfgs"], "--optimizer"),
    (["--steps", "3"], "NAME must come first"),
    (["StepLR", "--steps", "3", "--step_size", "2", "--lr", "fast"], "--lr"),
    (["StepLR", "--steps", "3", "--step_size", "2", "--width", "-5"], "--width"),
    (["ReduceLROnPlateau", "--steps", "3", "--metrics", "1,x"], "--metrics"),
    ([], "NAME is missing"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[0]) or "empty" for a in BAD])
def test_usage_errors_exit_2_and_list_names(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    text = captured.err + captured.out
    if message:
        assert message in text
    assert "usage: python -m fastopt schedule NAME" in text
    for name in ("StepLR", "OneCycleLR", "exponential_decay", "warmup_cosine"):
        assert name in text


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "NAME is one of" in capsys.readouterr().out
    assert main(["CyclicLR", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--base_lr VALUE" in out and "[--mode 'triangular']" in out


@pytest.mark.parametrize("spelling", ["steplr", "STEPLR", "stepLR"])
def test_names_in_any_case_print_the_canonical_name(capsys, spelling):
    assert main([spelling, "--steps", "6", "--step_size", "2", "--gamma", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "# StepLR"
    _, rows = table(out)
    assert [r[1] for r in rows] == reference(lambda o: L.StepLR(o, 2, 0.5), 6)
    assert main([spelling.upper().replace("STEPLR", "Exponential_Decay"), "--steps", "3",
                 "--initial_lr", "1", "--decay_steps", "1", "--decay_rate", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "# exponential_decay"
    assert [r[1] for r in table(out)[1]] == [1.0, 0.5, 0.25]


def test_optimizer_option_in_any_case_and_dashed_names(capsys):
    argv = ["CyclicLR", "--steps", "4", "--base-lr", "0.01", "--max_lr", "0.1",
            "--step-size-up", "2"]
    assert main(argv + ["--optimizer", "ADAM"]) == 0
    adam = table(capsys.readouterr().out)
    assert main(argv + ["--optimizer", "adam"]) == 0
    assert table(capsys.readouterr().out) == adam
    # Adam's betas[0] cycles between base_momentum 0.8 and max_momentum 0.9
    assert adam[0] == ["step", "lr", "momentum"]
    assert [r[1] for r in adam[1]] == pytest.approx([0.01, 0.055, 0.1, 0.055], rel=1e-12)
    assert [r[2] for r in adam[1]] == pytest.approx([0.9, 0.85, 0.8, 0.85], rel=1e-12)


def test_negative_and_equals_values(capsys):
    assert main(["LambdaLR", "--steps=3", "--lr=2", "--lr_lambda=lambda e: -e"]) == 0
    assert [r[1] for r in table(capsys.readouterr().out)[1]] == [-0.0, -2.0, -4.0]


def test_python_dash_m(tmp_path):
    env = dict(os.environ)
    out = tmp_path / "p.png"
    cmd = [sys.executable, "-m", "fastopt", "schedule", "ExponentialLR", "--steps", "4",
           "--gamma", "0.5"]
    if "matplotlib" in sys.modules or _has_matplotlib():
        cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    # an editable install may print its rebuild log first: start at the table's title
    _, rows = table(proc.stdout[proc.stdout.index("# ExponentialLR"):])
    assert [r[1] for r in rows] == [0.1, 0.05, 0.025, 0.0125]
    if "--out" in cmd:
        assert png_size(out) == (800, 500)
    bad = subprocess.run([sys.executable, "-m", "fastopt", "schedule", "Nope", "--steps", "2"],
                         check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2
    assert "StepLR" in bad.stderr


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
