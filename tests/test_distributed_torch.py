"""Data-parallel training with torch.distributed (gloo, CPU) and fastopt.torch's optimizers:
``DistributedDataParallel`` and ``ZeroRedundancyOptimizer(optimizer_class=fastopt.torch.Adam)``
in processes started by torchrun, each run next to the same run with torch.optim (see
tests/torch_dist_worker.py), and the DDP digits example.

Every launch has a timeout, so that a hang fails the test instead of stalling the suite.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch", reason="torch.distributed runs need torch")

from helpers import torch_sqrt_is_ieee  # noqa: E402

SQRT_IEEE = torch_sqrt_is_ieee(torch)
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 240


def _descendants(pid):
    """The processes below ``pid``, children first (torchrun starts its workers in sessions of
    their own, so a signal to its process group does not reach them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _signal(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _no_core_dumps():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def torchrun(nproc, *args, logs):
    """Run ``torchrun --standalone --nproc-per-node nproc args``, its output to files in
    ``logs``. A run still going after TIMEOUT fails the test with every process's Python
    stacks: its processes get SIGABRT, which faulthandler (PYTHONFAULTHANDLER) answers by
    printing them, then SIGKILL."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    paths = [os.path.join(logs, "torchrun.out"), os.path.join(logs, "torchrun.err")]
    with open(paths[0], "w") as out, open(paths[1], "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT,
                                preexec_fn=_no_core_dumps)
        try:
            proc.wait(timeout=TIMEOUT)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            below = _descendants(proc.pid)
            _signal(below, signal.SIGABRT)
            time.sleep(2)
            _signal([proc.pid], signal.SIGABRT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _signal([proc.pid, *below], signal.SIGKILL)
            proc.wait()
    stdout, stderr = (open(p).read() for p in paths)
    if hung:
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s (a hang); the Python stacks of "
                    f"its processes, and its output:\n{stdout[-4000:]}\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("mode", ["ddp", "zero"])
def test_data_parallel_runs_match_torch_optim_on_every_rank(tmp_path, mode, nproc):
    res = torchrun(nproc, os.path.join(HERE, "torch_dist_worker.py"), mode, str(tmp_path),
                   logs=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world"] == nproc and rep["ranks_equal"]
        # fastopt's Adam is torch's op for op: the same bits where torch's sqrt is IEEE's,
        # else last-bit differences (the tolerance in the worker is torch's float32 one)
        if SQRT_IEEE:
            assert rep["max_abs_diff"] == 0.0
        else:
            assert rep["max_abs_diff"] <= 1e-6
    if mode == "zero":
        # the state is sharded: every parameter's state lives on exactly one rank
        assert all(rep["local_type"] == "Adam" for rep in reports)
        assert sum(rep["local_state"] for rep in reports) == 4
        assert all(rep["local_state"] < 4 for rep in reports)
        assert reports[0]["consolidated_entries"] == 4
        assert reports[0]["loaded_into_one_process"]


@pytest.mark.parametrize("zero", [False, True])
def test_the_ddp_digits_example_learns(tmp_path, zero):
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    args = [os.path.join(ROOT, "examples", "digits_ddp.py"), "--epochs", "4"]
    res = torchrun(2, *args, *(["--zero"] if zero else []), logs=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy")
    assert float(last.split()[-1]) > 0.9
