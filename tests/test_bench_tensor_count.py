"""``python -m fastopt bench --tensor-count``: its fit and its table (speed itself is never
asserted)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt._cli import tensor_count


def test_the_fit_recovers_a_plane_exactly():
    a, b, c = 2.5e-6, 0.4e-6, 0.3e-9
    points = [(n, e, a + b * n + c * n * e) for n in (1, 10, 100, 1000) for e in (1, 1000)]
    got = tensor_count.fit(points)
    np.testing.assert_allclose(got, (a, b, c), rtol=1e-9)


def test_the_fit_weighs_the_relative_error():
    # one point 10% off at N = 10000 moves a little; the few-tensor points still fix a
    a, b, c = 3e-6, 1e-6, 0.5e-9
    points = [(n, e, a + b * n + c * n * e) for n in (1, 10, 100, 1000) for e in (1, 1000)]
    points.append((10000, 1, 1.1 * (a + b * 10000 + c * 10000)))
    fa, fb, fc = tensor_count.fit(points)
    assert abs(fa - a) / a < 0.2 and abs(fb - b) / b < 0.1


def test_run_times_every_case_and_prints_the_tables():
    lines = []
    before = fastopt.get_num_threads()
    fastopt.set_num_threads(2)
    try:
        res = tensor_count.run([1, 3], [1, 8], 1, "Adam", impls=("fastopt",),
                               out=lines.append)
        assert fastopt.get_num_threads() == 2  # it times one thread, then restores the setting
    finally:
        fastopt.set_num_threads(before)
    assert set(res) == {f"fastopt|{e}|{n}" for e in (1, 8) for n in (1, 3)}
    assert all(med > 0 and lo <= med <= hi for med, lo, hi in res.values())
    text = "\n".join(lines)
    assert "a + b N + c N E" in text and "E = 8:" in text
    assert any(l.startswith("fastopt ") for l in lines)


def test_the_cli_option_runs_the_sweep(tmp_path):
    pytest.importorskip("torch", reason="the sweep's torch columns need torch")
    out = tmp_path / "tc.json"
    res = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--tensor-count", "--quick",
                          "--rounds", "1", "--optimizers", "sgd", "--json", str(out)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "SGD, float32, 1 thread" in res.stdout
    data = json.loads(out.read_text())
    assert {k.split("|")[0] for k in data} >= {"fastopt", "fastopt.torch", "torch fused"}


def test_the_script_runs_chosen_cases_by_cpu_time(tmp_path, capsys):
    out = tmp_path / "tc.json"
    tensor_count.main(["--counts", "1,2", "--elements", "1,4", "--rounds", "1",
                       "--impls", "fastopt", "--cpu-time", "--json", str(out)])
    text = capsys.readouterr().out
    assert "CPU time of the thread" in text
    data = json.loads(out.read_text())
    assert set(data) == {f"fastopt|{e}|{n}" for e in (1, 4) for n in (1, 2)}
    assert all(med > 0 and lo <= med <= hi for med, lo, hi in data.values())


def test_the_script_refuses_an_unknown_case():
    with pytest.raises(SystemExit):
        tensor_count.main(["--impls", "fastopt,nonesuch"])


def test_backward_gradients_are_made_by_autograd_and_step_as_assigned_ones():
    torch = pytest.importorskip("torch", reason="the torch cases need torch")
    made = tensor_count.Case("fastopt.torch", "Adam", 3, 4, torch, backward=True)
    assigned = tensor_count.Case("fastopt.torch", "Adam", 3, 4, torch)
    for _ in range(2):
        made.feed()
        assigned.feed()
        for p, q, g in zip(made.params, assigned.params, made.grads[(made.k - 1) % 3]):
            assert p.grad is not g and p.grad.grad_fn is None
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        made.opt.step()
        assigned.opt.step()
        for p, q in zip(made.params, assigned.params):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    for _ in range(2):  # stepped without reading .grad from Python: the same parameters
        made.feed()
        assigned.feed()
        made.opt.step()
        assigned.opt.step()
    for p, q in zip(made.params, assigned.params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    lines = []
    tensor_count.run([1, 2], [1], 1, "Adam", impls=("fastopt", "fastopt.torch"),
                     out=lines.append, backward=True)
    assert "torch gradients made by backward" in lines[0]
