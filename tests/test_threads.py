"""Threads: the same bits for every thread count, and a thread count that is OpenMP's own.

fo_run splits a group's elements into one share per thread and each share into chunks that
idle threads take over; below a threshold one thread runs. Every per-element optimizer of the
database steps tensors laid out around that threshold and around share and chunk boundaries
with 1, 2, 3 and 4 threads, and the results must be the same bits. The thread count follows
OpenMP's setting for the calling thread: threadpoolctl, omp_set_num_threads (called through
ctypes on the runtime fastopt is linked to) and OMP_NUM_THREADS change it, and
fastopt.set_num_threads sets it. No test times anything.
"""
import ctypes
import json
import os
import select
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastopt
from fastopt import _kernels
from helpers import assert_bits, grads
from optim_db import configs

threadpoolctl = pytest.importorskip("threadpoolctl")

INFO = _kernels.build_info()
GRAIN, CHUNK, MAX = INFO["grain"], INFO["chunk"], INFO["max_threads"]
THRESHOLD = 2 * GRAIN  # fewer elements than this: one thread

#: tensor sizes of one group: at the threshold, across chunk and share boundaries (which fall
#: inside and between tensors), and with empty and one-element tensors among them
LAYOUTS = {
    "below-threshold": [THRESHOLD - 1],
    "at-threshold": [THRESHOLD],
    "threshold+17": [THRESHOLD + 17],
    "chunks+5": [4 * CHUNK + 5],
    "odd-shares": [3 * CHUNK + 2 * 16 + 3],
    "many": [5, CHUNK - 3, 0, CHUNK + 7, 1, 2 * CHUNK + 1, 7, 3],
}
STEPS = 3


def _run(name, kwargs, sizes, dtype, nthreads):
    """STEPS steps with nthreads threads; the parameters and state arrays afterwards."""
    fastopt.set_num_threads(nthreads)
    rng = np.random.default_rng(3)
    ps = [fastopt.Parameter(rng.standard_normal(n).astype(dtype)) for n in sizes]
    opt = fastopt.OPTIMIZERS[name](ps, **kwargs)
    for k in range(STEPS):
        for p in ps:
            p.grad = grads(rng, p.shape, dtype, k)
        opt.step()
    out = [np.array(p) for p in ps]
    for p in ps:
        out += [np.array(v) for _, v in sorted(opt.state[p].items())]
    return out


def _assert_same(runs, label):
    first = runs[0]
    for nthreads, run in enumerate(runs[1:], start=2):
        assert len(run) == len(first)
        for i, (a, b) in enumerate(zip(run, first)):
            assert_bits(a, b, f"{label}, {nthreads} threads, array {i}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,kwargs", configs())
def test_every_thread_count_gives_the_same_bits(name, kwargs, layout, threads):
    threads(1)
    runs = [_run(name, kwargs, LAYOUTS[layout], np.float32, n) for n in (1, 2, 3, 4)]
    _assert_same(runs, f"{name} {kwargs} {layout}")


@pytest.mark.parametrize("name,kwargs", configs())
def test_float64_every_thread_count_gives_the_same_bits(name, kwargs, threads):
    threads(1)
    runs = [_run(name, kwargs, LAYOUTS["many"], np.float64, n) for n in (1, 2, 3, 4)]
    _assert_same(runs, f"{name} {kwargs} float64")


def test_a_parameter_listed_twice_updates_in_list_order_with_threads(threads):
    """The same array twice in one group (torch steps it twice, in order): one thread runs
    that group whatever the setting, so 4 threads give the 1-thread bits."""
    out = []
    for n in (1, 4):
        threads(n)
        p = fastopt.Parameter(np.linspace(-1, 1, 4 * CHUNK, dtype=np.float32))
        p.grad = np.full(p.shape, 0.5, np.float32)
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = fastopt.SGD([p, p], lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.step()
        out.append(np.array(p))
    assert_bits(out[1], out[0], "listed twice")
    # each step moves p by two momentum updates
    assert not np.array_equal(out[0], np.linspace(-1, 1, 4 * CHUNK, dtype=np.float32))


def test_python_threads_stepping_at_once_give_the_same_bits(threads):
    """Two Python threads step their own large optimizers at the same time (one of them
    finds fastopt's threads busy and runs on its own thread): the serial results."""
    threads(1)
    expected = [_run("Adam", {"lr": 1e-2}, LAYOUTS["many"], np.float32, 1) for _ in range(2)]
    results, errors = [None, None], []

    def work(i):
        try:
            results[i] = _run("Adam", {"lr": 1e-2}, LAYOUTS["many"], np.float32, 4)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for r, e in zip(results, expected):
        _assert_same([e, r], "concurrent")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_steps_with_threads(threads):
    """After fork() the child has none of the parent's worker threads: its threaded steps
    start new ones (instead of waiting for threads that do not exist) and give the same
    bits."""
    threads(2)
    expected = _run("SGD", {"lr": 0.1, "momentum": 0.9}, [8 * CHUNK], np.float32, 2)[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest from here on
        try:
            got = _run("SGD", {"lr": 0.1, "momentum": 0.9}, [8 * CHUNK], np.float32, 2)[0]
            os.write(write, b"1" if got.tobytes() == expected.tobytes() else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 60)
        answer = os.read(read, 1) if ready else b"timeout"
    finally:
        os.close(read)
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert answer == b"1", answer


# ---- the thread count is OpenMP's ------------------------------------------------------------

def _fastopts_openmp():
    """The OpenMP runtime fastopt's extension is linked to (other libraries may have loaded
    their own copies): omp_set_num_threads looked up from the extension's handle, which
    searches its dependencies, and the path of the library that defines it."""
    lib = ctypes.CDLL(_kernels.__file__)

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]
    info = DlInfo()
    address = ctypes.cast(lib.omp_set_num_threads, ctypes.c_void_p)
    assert ctypes.CDLL(None).dladdr(address, ctypes.byref(info)) != 0
    return lib, os.path.realpath(info.dli_fname.decode())


def _openmp_info():
    path = _fastopts_openmp()[1]
    info = [i for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "openmp" and os.path.realpath(i["filepath"]) == path]
    return info[0] if info else None


needs_openmp = pytest.mark.skipif(not _kernels.have_openmp() or not sys.platform.startswith(
    "linux"), reason="needs fastopt built with OpenMP, on Linux")


@needs_openmp
def test_threadpool_limits_change_the_count_and_restore_it(threads):
    threads(2)
    assert fastopt.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(1):
        assert fastopt.get_num_threads() == 1
        out = _run("Adam", {"lr": 1e-2}, LAYOUTS["chunks+5"], np.float32, 1)
    assert fastopt.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(limits=3, user_api="openmp"):
        assert fastopt.get_num_threads() == 3
    assert fastopt.get_num_threads() == 2
    _assert_same([out, _run("Adam", {"lr": 1e-2}, LAYOUTS["chunks+5"], np.float32, 2)],
                 "threadpool_limits")


@needs_openmp
def test_set_num_threads_is_openmps_setting(threads):
    """threadpoolctl reports what fastopt.set_num_threads set, since it is OpenMP's."""
    info = _openmp_info()
    if info is None:
        pytest.skip("threadpoolctl does not see the OpenMP runtime fastopt loaded")
    threads(3)
    assert _openmp_info()["num_threads"] == 3
    threads(1)
    assert _openmp_info()["num_threads"] == 1


@needs_openmp
def test_omp_set_num_threads_through_ctypes_changes_the_count(threads):
    lib = _fastopts_openmp()[0]
    threads(2)
    lib.omp_set_num_threads(3)
    assert fastopt.get_num_threads() == 3 == lib.omp_get_max_threads()
    lib.omp_set_num_threads(1)
    assert fastopt.get_num_threads() == 1


@needs_openmp
def test_the_setting_belongs_to_the_calling_thread(threads):
    """As omp_set_num_threads: a Python thread that sets a count changes its own."""
    threads(1)
    seen = []

    def other():
        fastopt.set_num_threads(3)
        seen.append(fastopt.get_num_threads())
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [3]
    assert fastopt.get_num_threads() == 1


@pytest.mark.parametrize("value", [0, -1, MAX + 1, 10 ** 9, 2 ** 40, -(2 ** 70)])
def test_counts_out_of_range_are_refused_and_change_nothing(value, threads):
    threads(2)
    with pytest.raises(ValueError, match=f"positive integer no larger than {MAX}, got "
                                         f"{value}"):
        fastopt.set_num_threads(value)
    assert fastopt.get_num_threads() == 2


@pytest.mark.parametrize("value", [True, 2.5, "2", None])
def test_counts_that_are_no_integer_are_refused_and_change_nothing(value, threads):
    threads(2)
    with pytest.raises(TypeError, match="set_num_threads expects an int"):
        fastopt.set_num_threads(value)
    assert fastopt.get_num_threads() == 2


def test_the_largest_count_is_accepted(threads):
    threads(MAX)
    assert fastopt.get_num_threads() == (MAX if _kernels.have_openmp() else 1)


_CHILD = """
import numpy as np, fastopt
print(fastopt.get_num_threads())
p = fastopt.Parameter(np.linspace(-1, 1, {n}, dtype=np.float32))
p.grad = np.full(p.shape, 0.25, np.float32)
opt = fastopt.Adam([p], lr=0.1)
for _ in range(3):
    opt.step()
print(np.asarray(p).tobytes().hex())
"""


@needs_openmp
def test_omp_num_threads_in_a_subprocess():
    out = {}
    for n in ("1", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=n)
        res = subprocess.run([sys.executable, "-c", _CHILD.format(n=5 * CHUNK)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        count, data = res.stdout.split()[-2:]  # after what an editable rebuild prints
        assert count == n
        out[n] = data
    assert out["1"] == out["3"]


# ---- the benchmark's thread sweep -------------------------------------------------------------

def test_busy_core_starts_and_stops_its_process():
    from fastopt._cli.threads import busy_core
    with busy_core() as proc:
        assert proc.poll() is None  # spinning
    assert proc.returncode is not None
    with busy_core(False) as none:
        assert none is None


@pytest.mark.parametrize("load", [True, False], ids=["load", "no-load"])
def test_bench_thread_sweep_prints_one_row_per_case(load, capsys, threads):
    from fastopt._cli import main
    threads(1)
    argv = ["bench", "--thread-sweep", "--quick", "--optimizers", "sgd,adam", "--sizes",
            "1e4,2x70000", "--rounds", "1"] + ([] if load else ["--no-load"])
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert ("one core kept busy" in out[0]) == load
    rows = [line.split() for line in out if line.startswith(("SGD", "Adam"))]
    assert [r[:2] for r in rows] == [["SGD", "1e4"], ["SGD", "2x70000"], ["Adam", "1e4"],
                                     ["Adam", "2x70000"]]
    for r in rows:
        one, two, ratio = map(float, r[2:5])
        lo, hi = map(float, r[5].split(".."))
        assert one > 0 and two > 0 and lo <= ratio <= hi
    assert fastopt.get_num_threads() == 1  # restored


# ---- affinity: workers are woken away from the calling thread's CPU, and left as they were ----

_AFFINITY_CHILD = """
import json, os, time, numpy as np, fastopt
if {pin}:
    os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
mask = sorted(os.sched_getaffinity(0))
fastopt.set_num_threads(2)
p = fastopt.Parameter(np.zeros({n}, np.float32))
p.grad = np.ones({n}, np.float32)
opt = fastopt.SGD([p], lr=0.5)
for k in range(30):
    opt.step()
    if k % 2:
        time.sleep(0.002)  # the workers fall asleep; the next step wakes them
time.sleep(0.01)
def name(t):
    with open(f"/proc/self/task/{{t}}/comm") as f:
        return f.read().strip()
masks = {{t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")
         if t == str(os.getpid()) or name(t) == "fastopt-worker"}}
print(json.dumps({{"mask": mask, "masks": masks, "p": float(np.asarray(p)[0])}}))
"""


@needs_openmp
@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")
@pytest.mark.parametrize("pin", [False, True], ids=["free", "pinned-to-one-cpu"])
def test_the_workers_affinity_is_left_as_it_was(pin):
    """The master takes its CPU out of a sleeping worker's mask before waking it, a worker
    starts with that CPU out of its mask, and a worker on the master's CPU moves off it: each
    puts the mask back once on its way. After steps that wake sleeping workers every thread
    of fastopt (the main one and its workers, named ``fastopt-worker``) has the mask it
    started with, the whole of it (or the one CPU a user pinned the process to, which fastopt
    never leaves)."""
    n = 1 << 21  # large enough to wake sleeping workers
    res = subprocess.run([sys.executable, "-c", _AFFINITY_CHILD.format(pin=pin, n=n)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["p"] == -15.0  # 30 steps of lr 0.5 on a gradient of 1
    assert len(out["mask"]) == (1 if pin else len(os.sched_getaffinity(0)))
    assert len(out["masks"]) == 2  # the main thread and its worker
    assert {t: m for t, m in out["masks"].items() if m != out["mask"]} == {}
