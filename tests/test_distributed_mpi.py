"""fastopt.distributed under real MPI jobs: ``mpiexec -n N`` launches tests/mpi_worker.py.

The MPI tests need mpi4py and an ``mpiexec`` (``pip install "fastopt[distributed]"``) and
skip without them. Every launch has a timeout, and the whole process group is killed when it
runs out, so a hang fails the test instead of stalling the suite. Three and four ranks are
oversubscribed on a 2-core machine; MPICH's launcher needs no option for that.

Which reductions depend on the order, and how it is pinned: a float sum of three or more
terms depends on its grouping. ``average_gradients`` sums in rank order itself (an
``Alltoallv`` of slices, each summed by its owner in rank order), so the worker compares its
result with ``((g_0 + g_1) + ...) / N`` computed in one process, bit for bit; with 2 ranks
every order gives the same bits (addition commutes), so 3 and 4 ranks are the telling runs,
and the worker checks that its gradients (six decades of magnitude) give other bits when
summed in another order. MPICH's own ``Allreduce`` happens to sum 3 ranks in rank order but 4
as ``(g_0 + g_1) + (g_2 + g_3)``; ``deterministic=False`` (that ``Allreduce``) is therefore
checked against the bound on two orders of the same sum, ``2 (N - 1) eps sum|g_i| / N``.
``ZeroOptimizer`` reduce-scatters in the same rank order, and its parameters are compared bit
for bit with one process stepping the same optimizer with that ordered mean.
"""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "digits_mlp_mpi.py")


def _mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def _have_mpi4py():
    try:
        import mpi4py  # noqa: F401  (the package only: MPI itself starts with mpi4py.MPI)
    except ImportError:
        return False
    return True


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    not _have_mpi4py() or MPIEXEC is None,
    reason="needs mpi4py and mpiexec (pip install mpi4py mpich: the distributed extra)")


def run_mpi(n, args, timeout=120):
    """``mpiexec -n n python args...``: (exit status, stdout, stderr); a hang fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {args} did not finish in {timeout} s (a hang)\n"
                    f"stdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def test_import_fastopt_does_not_import_mpi4py(tmp_path):
    """Nor does a sharded checkpoint of a plain optimizer, saved and loaded in one process."""
    code = ("import sys, numpy as np, fastopt, fastopt.distributed as d\n"
            "p = fastopt.Parameter(np.zeros(3, np.float32)); p.grad = np.ones(3, np.float32)\n"
            "opt = fastopt.Adam([p]); opt.step()\n"
            f"d.save({str(tmp_path)!r}, opt)\n"
            "q = fastopt.Parameter(np.zeros(3, np.float32)); new = fastopt.Adam([q])\n"
            f"d.load({str(tmp_path)!r}, new)\n"
            "assert np.array_equal(new.state[q]['exp_avg'], opt.state[p]['exp_avg'])\n"
            "assert 'mpi4py' not in sys.modules, sorted(m for m in sys.modules if 'mpi' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert os.listdir(tmp_path) == ["shard-00000-of-00001.safetensors"]


def test_sharded_checkpoint_of_a_plain_optimizer_refuses_unshardable_state(tmp_path):
    """A group's state is one array per key, so its parameters must share dtype, state keys
    and 0-d state; otherwise a ValueError names the parameter and key, and nothing is
    written."""
    def make(dtype2=np.float32, step_only_first=False, group_two=False):
        a = fastopt.Parameter(np.zeros(3, np.float32))
        b = fastopt.Parameter(np.zeros(2, dtype2))
        opt = fastopt.Adam([{"params": [a]}, {"params": [b]}] if group_two else [a, b])
        for _ in range(2):
            a.grad = np.ones(3, np.float32)
            b.grad = None if step_only_first else np.ones(2, dtype2)
            opt.step()
            step_only_first = False     # the second step steps both: steps 2 and 1
        return opt

    cases = [
        (make(np.float64), ("param_groups[0] mixes dtypes ['float32', 'float64']; a sharded "
                            "checkpoint keeps each group's state as one array")),
        (make(step_only_first=True), ("param_groups[0]['params'][1]: state['step'] is "
                                      "array(1., dtype=float32), at param_groups[0]['params']"
                                      "[0] array(2., dtype=float32); a sharded checkpoint "
                                      "keeps one 'step' per group")),
    ]
    for opt, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            distributed.save(tmp_path / "c", opt)
        assert not (tmp_path / "c").exists()
    fresh = fastopt.Adam([fastopt.Parameter(np.zeros(3, np.float32)),
                          fastopt.Parameter(np.zeros(2, np.float32))])
    p = fresh.param_groups[0]["params"][0]
    p.grad = np.ones(3, np.float32)
    fresh.step()                                        # the second parameter has no state
    with pytest.raises(ValueError, match=re.escape(
            "param_groups[0]['params'][1] has state [], param_groups[0]['params'][0] "
            "['exp_avg', 'exp_avg_sq', 'step']; a sharded checkpoint keeps one state per "
            "group")):
        distributed.save(tmp_path / "c", fresh)
    # groups of one dtype each, stepped apart: fine, and loaded back the same
    opt = make(np.float64, step_only_first=True, group_two=True)
    distributed.save(tmp_path / "c", opt)
    new = fastopt.Adam([{"params": [fastopt.Parameter(np.zeros(3, np.float32))]},
                        {"params": [fastopt.Parameter(np.zeros(2, np.float64))]}])
    assert distributed.load(tmp_path / "c", new) is None
    for (_, st), (_, nst) in zip(opt.state.items(), new.state.items()):
        assert sorted(st) == sorted(nst)
        assert all(np.array_equal(st[k], nst[k]) and st[k].dtype == nst[k].dtype for k in st)


def test_plan_buckets():
    def params(*specs):
        out = []
        for n, dtype, has_grad in specs:
            p = fastopt.Parameter(np.zeros(n, dtype=dtype))
            p.grad = np.zeros(n, dtype=dtype) if has_grad else None
            out.append(p)
        return out

    f4, f8 = np.float32, np.float64
    ps = params((10, f4, True), (10, f4, True), (10, f4, True), (100, f4, True),
                (3, f4, False), (2, f4, True))
    # 40 bytes each: two fit in 80; the 400-byte gradient gets a bucket of its own
    assert distributed.plan_buckets(ps, 80) == [[0, 1], [2], [3], [5]]
    assert distributed.plan_buckets(ps) == [[0, 1, 2, 3, 5]]
    assert distributed.plan_buckets(ps, 1) == [[0], [1], [2], [3], [5]]
    # one dtype per bucket, dtypes in order of first appearance
    mixed = params((4, f8, True), (4, f4, True), (4, f8, True), (4, f4, True))
    assert distributed.plan_buckets(mixed) == [[0, 2], [1, 3]]
    opt = fastopt.SGD([{"params": mixed[:2]}, {"params": mixed[2:]}], lr=0.1)
    assert distributed.plan_buckets(opt, 32) == [[0], [2], [1, 3]]   # 32 + 32 > 32
    assert distributed.plan_buckets(opt, 24) == [[0], [2], [1], [3]]
    for bad in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match="bucket_bytes must be a positive integer"):
            distributed.plan_buckets(ps, bad)


def expected_errors(n):
    last = n - 1
    return {
        "missing": f"rank {last} of {n}: params[1]: .grad is None (missing), on rank 0 .grad "
                   f"has shape (5,) float32",
        "shape": f"rank 1 of {n}: params[0]: .grad has shape (4, 3), the parameter (3, 4)",
        "dtype": f"rank 0 of {n}: params[0]: .grad has dtype float64, the parameter float32",
        "readonly": f"rank {last} of {n}: params[2]: .grad is read-only (it is averaged in "
                    f"place)",
        "count": f"rank 1 of {n} has 3 parameters, rank 0 has 4",
        "param_shape": f"rank 1 of {n}: params[1] has shape (6,) float32, on rank 0 shape "
                       f"(5,) float32",
        "group": f"rank {last} of {n}: param_groups[1]['params'][2]: .grad has shape (3,), "
                 f"the parameter (64,)",
        "grouping": f"rank 1 of {n}: parameter 3 is param_groups[1]['params'][0], on rank "
                    f"0 param_groups[0]['params'][3] (the ranks group their parameters "
                    f"differently)",
        "zero_missing": f"rank {last} of {n}: param_groups[0]['params'][1]: .grad is None "
                        f"(missing), on rank 0 .grad has shape (5,) float32",
        "zero_none": "param_groups[0]['params'][1]: .grad is None on every rank; "
                     "ZeroOptimizer steps every parameter",
        "zero_dtypes": "param_groups[0] mixes dtypes ['float32', 'float64']; ZeroOptimizer "
                       "shards each group as one array: put each dtype in its own group",
        "zero_class": "ZeroOptimizer needs a per-element fastopt optimizer class (one of "
                      "fastopt.OPTIMIZERS)",
    }


@needs_mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_average_step_and_errors_under_mpiexec(n, tmp_path):
    """Averages bit for bit, steps as one process (also ZeRO-1 sharded: every per-element
    optimizer, each rank holding 1/N of the state), and every rank raises the same error."""
    rc, out, err = run_mpi(n, [WORKER, "check", str(tmp_path)])
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in results) == list(range(n)), out
    assert all(r["size"] == n for r in results)
    for r in results:
        assert r["errors"] == expected_errors(n), r["rank"]


@needs_mpi
def test_a_rank_that_raises_in_step_aborts_the_job():
    """Rank 1's step() raises while ranks 0 and 2 wait in a collective: the job ends."""
    rc, out, err = run_mpi(3, [WORKER, "abort"], timeout=60)
    assert rc != 0
    assert "fastopt.distributed: rank 1 of 3 raised an exception; aborting the MPI job" in err
    assert ("ValueError: param_groups[0]['params'][0]: .grad has shape (2,), the parameter "
            "(3, 4)") in err
    assert "finished" not in out


@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn provides the digits data set")
def test_digits_example_trains_data_parallel():
    rc, out, err = run_mpi(2, [EXAMPLE, "--quick"])
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"test accuracy ([0-9.]+)% after 6 epochs on 2 ranks in [0-9.]+ s; "
                         r"parameters identical on all ranks", last)
    assert match, last
    assert float(match.group(1)) > 95
    assert out.count("test accuracy") == 1               # rank 0 alone prints


@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_torch_tensors_under_mpiexec(tmp_path):
    """A torch model's gradients averaged in place (stepped by fastopt.torch.Adam and by
    torch.optim.SGD) and its parameters sharded by ZeroOptimizer: the bits of one process
    stepping with the averaged gradients."""
    rc, out, err = run_mpi(3, [WORKER, "torch", str(tmp_path)])
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in results] == [0, 1, 2]
    for r in results:
        assert r["errors"] == {
            "torch_missing": "rank 2 of 3: param_groups[0]['params'][1]: .grad is None "
                             "(missing), on rank 0 .grad has shape (16,) float32",
            "torch_freed": "rank 2 of 3: param_groups[0]['params'][0]: .grad is a tensor "
                           "whose storage holds 0 bytes, fewer than its 128 elements of 4 "
                           "bytes need (its memory was freed or shrunk with "
                           "untyped_storage().resize_()); give it its memory back first"}


def expected_checkpoint_errors(scratch):
    shard = "shard-0000{}-of-00003.safetensors"
    good = f"GOOD/Adam/{shard.format(0)}"
    return {
        "ckpt_missing": f"IncompleteCheckpointError: SCRATCH/missing/{shard.format(2)}: "
                        f"missing (the checkpoint was saved by 3 ranks)",
        "ckpt_corrupt": f"CorruptCheckpointError: SCRATCH/corrupt/{shard.format(1)}: "
                        f"checksum mismatch: the file is corrupted",
        "ckpt_mixed": f"IncompleteCheckpointError: SCRATCH/mixed/{shard.format(1)} is of "
                      f"another save than SCRATCH/mixed/{shard.format(0)} (the shards carry "
                      f"different ids: a save that did not finish, or files of two "
                      f"checkpoints)",
        "ckpt_stray": "IncompleteCheckpointError: SCRATCH/stray: holds shard files of "
                      "checkpoints of [3, 4] ranks; a save that did not finish? remove the "
                      "shards of the one to drop",
        "ckpt_count": f"CheckpointMismatchError: {good}: param_groups[0] has 6 parameters "
                      f"in the checkpoint, 5 in the optimizer",
        "ckpt_shape": f"CheckpointMismatchError: {good}: param_groups[0]['params'][1] has "
                      f"shape (5,) in the checkpoint, (6,) in the optimizer",
        "ckpt_shape_rank1": f"CheckpointMismatchError: {good}: param_groups[0]['params'][1] "
                            f"has shape (5,) in the checkpoint, (6,) in the optimizer (found "
                            f"on rank 1 of 2)",
        "ckpt_class": f"CheckpointMismatchError: {good}: the checkpoint holds the state of a "
                      f"fastopt.adam.Adam, not of a fastopt.adam.AdamW",
        "ckpt_nodir": "FileNotFoundError: SCRATCH/nothing: no such checkpoint directory",
        "ckpt_no_scheduler": f"CheckpointMismatchError: {good}: wrong schedulers: scheduler "
                             f"is nothing, the checkpoint holds one scheduler",
        "ckpt_save_extra": "extra['f']: cannot store a builtins.builtin_function_or_method in "
                           "a checkpoint (arrays, numbers, strings, None, and lists, tuples "
                           "and dicts of them only) (found on rank 0 of 2)",
    }


@needs_mpi
def test_sharded_checkpoints_reshard_under_mpiexec(tmp_path):
    """Save on 2 ranks, resume on 3, on 2, in one process (a plain optimizer, and a
    ZeroOptimizer of one rank), on 2 again:
    every step of every run equals one process that never stopped, bit for bit (Adam with
    AMSGrad, NAdam and ASGD with their 0-d state, SGD with momentum; a StepLR each); and
    damaged or mismatched checkpoints raise the same error on every rank, changing nothing."""
    d = {k: str(tmp_path / k) for k in ("A", "B", "B3", "C", "D", "E", "scratch", "out")}
    os.makedirs(d["scratch"])
    os.makedirs(d["out"])
    runs = [(2, "ckpt", ["-", d["A"], "0", "2"]),
            (3, "ckpt", [d["A"], d["B"], "2", "4", d["B3"]]),      # B3: saved at step 3
            (2, "ckpt", [d["B"], d["C"], "4", "6", d["B3"], d["scratch"], d["out"]]),
            (1, "ckpt-plain", [d["C"], d["D"], "6", "8"]),
            (2, "ckpt", [d["D"], d["E"], "8", "10"])]
    for n, mode, args in runs:
        rc, out, err = run_mpi(n, [WORKER, mode, *args])
        assert rc == 0, f"{mode} {args}\nstdout:\n{out}\nstderr:\n{err}"
    assert sorted(os.listdir(os.path.join(d["B"], "Adam"))) == [
        f"shard-0000{r}-of-00003.safetensors" for r in range(3)]
    assert os.listdir(os.path.join(d["D"], "Adam")) == ["shard-00000-of-00001.safetensors"]
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("out/rank*.json"))]
    assert [r["rank"] for r in results] == [0, 1]
    want = expected_checkpoint_errors(d["scratch"])
    for r in results:
        got = dict(r["errors"])
        # the checksum message ends with the two hashes
        got["ckpt_corrupt"] = got["ckpt_corrupt"].split(" (its contents hash")[0]
        assert got == want, r["rank"]


@needs_mpi
def test_bench_distributed_reports_the_state_per_rank(tmp_path):
    """``python -m fastopt bench --distributed``: every rank count's rows, with the state
    bytes per rank of Adam over 10 tensors of 100 elements (two float32 arrays per element,
    and a float32 step counter per tensor, or per group for ZeroOptimizer's shard)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--distributed",
                           "--sizes", "1000", "--ranks", "1,2", "--rounds", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["size"], r["ranks"]) for r in rows] == [(1000, 1), (1000, 2)]
    assert [r["dp_state"] for r in rows] == [[8040], [8040, 8040]]
    assert [r["zero_state"] for r in rows] == [[8004], [4004, 4004]]
    for r in rows:
        assert len(r["dp"]) == len(r["zero"]) == 2
        assert all(s["comm"] >= 0 and s["update"] > 0 for s in r["dp"] + r["zero"])
    lines = proc.stdout.splitlines()
    assert any(line.startswith("fastopt.distributed, Adam float32, 10 tensors per size, 1 "
                               "kernel thread per rank, buckets of 25 MiB") for line in lines)
    assert [line.split()[:3] for line in lines[-4:]] == [
        ["1e+03", "1", "dp"], ["1e+03", "1", "zero"], ["1e+03", "2", "dp"],
        ["1e+03", "2", "zero"]]


@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn provides the digits data set")
def test_digits_example_resumes_a_sharded_checkpoint_on_more_ranks(tmp_path):
    """--zero --checkpoint: 3 epochs on 2 ranks, stopped, then the last 3 on 3 ranks from
    the sharded checkpoint, to the accuracy of a run that never stopped."""
    ck = str(tmp_path / "ck")
    common = [EXAMPLE, "--quick", "--zero", "--checkpoint", ck]
    rc, out, err = run_mpi(2, [*common, "--stop-after", "3"])
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert out.strip().splitlines()[-1].startswith("test accuracy ")
    assert " after 3 epochs on 2 ranks " in out.strip().splitlines()[-1]
    assert sorted(os.listdir(ck)) == [f"shard-0000{r}-of-00002.safetensors" for r in (0, 1)]
    rc, out, err = run_mpi(3, common)
    assert rc == 0, f"stdout:\n{out}\nstderr:\n{err}"
    lines = out.strip().splitlines()
    assert f"resumed from {ck} after epoch 3" in lines
    assert [line.split()[0] for line in lines if re.match(r" *[0-9]+ ", line)] == [
        "4", "5", "6"]                                  # the table's epoch rows
    match = re.fullmatch(r"test accuracy ([0-9.]+)% after 6 epochs on 3 ranks in [0-9.]+ s; "
                         r"parameters identical on all ranks", lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) > 95
    assert sorted(os.listdir(ck)) == [f"shard-0000{r}-of-00003.safetensors" for r in range(3)]
