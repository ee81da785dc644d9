"""``python -m fastopt demo``: tables, pictures, and the same numbers as the examples."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from fastopt import _demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNGS = {  # --quick sizes
    "trajectories_f1.png": (900, 540),
    "trajectories_f2.png": (900, 540),
    "trajectories_3d.png": (900, 540),
    "linear_fit.png": (900, 360),
    "schedules.png": (900, 700),
}


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.01
    return pixels.shape[1], pixels.shape[0]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib (the plot extra) is not installed")
def test_demo_quick_writes_pictures_and_summary(tmp_path):
    out = tmp_path / "pics"
    cmd = [sys.executable, "-m", "fastopt", "demo", "--quick", "--out", str(out)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(PNGS)
    for name, size in PNGS.items():
        assert png_size(out / name) == size, name
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    assert lines[header].split() == ["optimizer", "final", "f1", "final", "f2", "fit", "loss",
                                     "us/step"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 2:header + 8]}
    assert list(rows) == ["SGD", "Momentum", "Nesterov", "Adagrad", "RMSprop", "Adam"]
    for name, cells in rows.items():
        f1, f2 = float(cells[0]), float(cells[1])
        assert f1 < 6.45 / 10 and f2 < 33.8 / 10, name  # well below f at the start
        if cells[2] != "-":
            assert float(cells[2]) < 1.3 * _demo.NOISE ** 2, name  # at the noise floor
        assert 0 < float(cells[3]) < 1e4, name  # microseconds per step
    assert rows["Nesterov"][2] == "-"  # not part of the fit
    assert any("OneCycleLR" in line for line in lines)
    assert sum(line.startswith("wrote ") for line in lines) == 5


def test_demo_without_matplotlib_prints_tables_and_the_hint(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fastopt import _demo\n"
            f"sys.exit(_demo.main(['--quick', '--out', {str(tmp_path / 'pics')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert 'pip install "fastopt[plot]"' in r.stdout
    assert "optimizer" in r.stdout and "CosineAnnealingLR" in r.stdout
    assert not (tmp_path / "pics").exists()


def test_demo_usage(capsys):
    assert _demo.main(["--help"]) == 0
    assert "--quick" in capsys.readouterr().out
    assert _demo.main(["--bogus"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_demo_experiments_are_the_examples():
    """The demo and examples/ run the same experiments: identical numbers."""
    traj = load_example("trajectories").run_all()
    mine = _demo.run_trajectories()
    for problem in traj:
        assert list(traj[problem]) == list(mine[problem])
        for name in traj[problem]:
            np.testing.assert_array_equal(traj[problem][name][0], mine[problem][name][0])
    fit = load_example("linear_fit").run_all()
    mine = _demo.run_linear_fit()
    assert list(fit) == list(mine)
    for name in fit:
        np.testing.assert_array_equal(fit[name]["iter_loss"], mine[name]["iter_loss"])
        np.testing.assert_array_equal(fit[name]["w"], mine[name]["w"])


def test_schedule_gallery_shapes():
    from fastopt.plot import lr_trace

    gallery = _demo.schedule_gallery(100)
    assert len(gallery) == 9
    for title, sched in gallery:
        lrs = [row[0] for row in lr_trace(sched, 100)["lr"]]
        assert max(lrs) <= 0.1 + 1e-12 and min(lrs) >= 0, title
    traces = {t: [row[0] for row in lr_trace(s, 100)["lr"]] for t, s in gallery}
    one = traces["OneCycleLR"]
    assert one[0] < one[30] and one[-1] < one[0]  # warm up, then anneal below the start
    warm = traces["warm-up then cosine (SequentialLR)"]
    assert warm[0] == pytest.approx(1e-3) and max(warm) == pytest.approx(0.1)
