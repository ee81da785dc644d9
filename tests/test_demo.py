"""``python -m fastopt demo``: tables, pictures, and the numbers of the example programs it runs."""
import importlib.util
import os
import subprocess
import sys

import pytest

from fastopt._cli import demo, main

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
            assert float(cells[2]) < 1.3 * 0.1 ** 2, name  # at the noise floor (sd 0.1)
        assert 0 < float(cells[3]) < 1e4, name  # microseconds per step
    assert "-" not in [cells[2] for cells in rows.values()]  # every optimizer in the fit
    assert any("OneCycleLR" in line for line in lines)
    assert sum(line.startswith("wrote ") for line in lines) == 5


def summary_rows(stdout):
    """``{optimizer: [final f1, final f2, fit loss, us/step]}`` of the demo's summary table."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    return {line.split()[0]: line.split()[1:] for line in lines[header + 2:header + 8]}


def test_demo_without_matplotlib_prints_tables_and_the_hint(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fastopt._cli import main\n"
            f"sys.exit(main(['demo', '--quick', '--out', {str(tmp_path / 'pics')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert 'pip install "fastopt[plot]"' in r.stdout
    assert "optimizer" in r.stdout and "CosineAnnealingLR" in r.stdout
    assert not (tmp_path / "pics").exists()
    # the table holds the results of the example programs in examples/
    rows = summary_rows(r.stdout)
    traj = load_example("trajectories")
    paths = traj.run_all()
    fit = load_example("linear_fit").run_all()
    assert list(rows) == list(paths["f1"])
    for name, cells in rows.items():
        assert cells[0] == f"{traj.value('f1', paths['f1'][name][0][-1]):.3e}", name
        assert cells[1] == f"{traj.value('f2', paths['f2'][name][0][-1]):.3e}", name
        expected_fit = f"{fit[name]['epoch_loss'][-1]:.3e}" if name in fit else "-"
        assert cells[2] == expected_fit, name


def test_demo_imports_the_example_programs():
    """The wheel installs examples/ as fastopt.examples (pyproject.toml's wheel.packages);
    the demo runs those programs rather than a copy of them."""
    trajectories, linear_fit = demo.examples()
    assert trajectories.__name__ == "fastopt.examples.trajectories"
    assert linear_fit.__name__ == "fastopt.examples.linear_fit"
    assert os.path.basename(trajectories.__file__) == "trajectories.py"
    assert os.path.basename(linear_fit.__file__) == "linear_fit.py"


def test_demo_usage(capsys):
    assert main(["demo", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["demo", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_schedule_gallery_shapes():
    from fastopt.plot import lr_trace

    gallery = demo.schedule_gallery(100)
    assert len(gallery) == 9
    for title, sched in gallery:
        lrs = [row[0] for row in lr_trace(sched, 100)["lr"]]
        assert max(lrs) <= 0.1 + 1e-12 and min(lrs) >= 0, title
    traces = {type(s).__name__: [row[0] for row in lr_trace(s, 100)["lr"]] for t, s in gallery}
    one = traces["OneCycleLR"]
    assert one[0] < one[30] and one[-1] < one[0]  # warm up, then anneal below the start
    warm = traces["SequentialLR"]
    assert warm[0] == pytest.approx(1e-3) and max(warm) == pytest.approx(0.1)


def test_schedule_gallery_titles_give_the_arguments():
    gallery = dict(demo.schedule_gallery(100))
    by_type = {type(s).__name__: (t, s) for t, s in gallery.items()}
    title, multi = by_type["MultiStepLR"]
    assert sorted(multi.milestones) == [50, 75] and multi.gamma == 0.1
    assert title == "MultiStepLR(milestones=[50, 75], gamma=0.1)"
    assert by_type["StepLR"][0] == "StepLR(step_size=25, gamma=0.5)"
    assert by_type["CosineAnnealingLR"][0] == "CosineAnnealingLR(T_max=100)"
    title, warm = by_type["SequentialLR"]
    assert title == "warm-up 10 steps, then CosineAnnealingLR(T_max=90)"
    assert warm._milestones == [10]
    for title, sched in gallery.items():
        assert title.startswith(type(sched).__name__) or type(sched).__name__ == "SequentialLR"
        assert "(" in title, title  # every title gives the arguments


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib (the plot extra) is not installed")
def test_schedule_gallery_picture_labels_its_axes():
    gallery = demo.schedule_gallery(100)
    fig = demo._gallery_figure(gallery, 100, (900, 700))
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [t for t, _ in gallery]
    assert [ax.get_xlabel() for ax in axes[-3:]] == ["step (scheduler.step() calls)"] * 3
    assert all(ax.get_ylabel() == "learning rate" for ax in axes)
    assert "lr=0.1" in fig.get_suptitle()
