"""Data-parallel training with torch.distributed (gloo, CPU) and fastopt.torch's optimizers:
``DistributedDataParallel`` and ``ZeroRedundancyOptimizer(optimizer_class=fastopt.torch.Adam)``
in processes started by torchrun, each run next to the same run with torch.optim (see
tests/torch_dist_worker.py), and the DDP digits example.

Every launch has a timeout, so that a hang fails the test instead of stalling the suite.
"""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch.distributed runs need torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 240


def torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                              cwd=ROOT, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s (a hang?); its output:\n"
                    f"{e.stdout}\n{e.stderr}")


@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("mode", ["ddp", "zero"])
def test_data_parallel_runs_match_torch_optim_on_every_rank(tmp_path, mode, nproc):
    res = torchrun(nproc, os.path.join(HERE, "torch_dist_worker.py"), mode, str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world"] == nproc and rep["ranks_equal"]
        # fastopt's Adam is torch's op for op: the same bits (the tolerance in the worker is
        # torch's float32 one)
        assert rep["max_abs_diff"] == 0.0
    if mode == "zero":
        # the state is sharded: every parameter's state lives on exactly one rank
        assert all(rep["local_type"] == "Adam" for rep in reports)
        assert sum(rep["local_state"] for rep in reports) == 4
        assert all(rep["local_state"] < 4 for rep in reports)
        assert reports[0]["consolidated_entries"] == 4
        assert reports[0]["loaded_into_one_process"]


@pytest.mark.parametrize("zero", [False, True])
def test_the_ddp_digits_example_learns(zero):
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    args = [os.path.join(ROOT, "examples", "digits_ddp.py"), "--epochs", "4"]
    res = torchrun(2, *args, *(["--zero"] if zero else []))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy")
    assert float(last.split()[-1]) > 0.9
