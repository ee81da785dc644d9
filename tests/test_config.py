"""show_config, thread control, ISA dispatch overrides, the version, and the command line
(``python -m fastopt``: argparse subcommands, bench)."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _cli, _kernels
from fastopt._cli.cases import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses start in the repository root, where the README's commands run: the package
# lives in src/, so the folder first on sys.path with -c and -m holds no fastopt and they
# import the installed one.


def test_show_config_reports_and_prints(capsys):
    cfg = fastopt.show_config()
    out = capsys.readouterr().out
    assert cfg["isa"] in ("baseline", "avx2", "avx512")
    assert cfg["isa"] in cfg["isa_supported"] and "baseline" in cfg["isa_supported"]
    assert cfg["num_threads"] == fastopt.get_num_threads() >= 1
    assert isinstance(cfg["openmp"], bool)
    assert "-fno-math-errno" in cfg["kernel_flags"] and "-ffp-contract=off" in cfg["kernel_flags"]
    assert "-march=native" not in cfg["kernel_flags"]
    for key in cfg:
        assert key in out
    assert fastopt.show_config(print_=False) == cfg
    assert capsys.readouterr().out == ""


def test_best_level_is_chosen_by_default():
    levels = _kernels.isa_levels()
    supported = [l for l in levels if _kernels.isa_supported(l)]
    code = "import fastopt; print(fastopt.show_config(False)['isa'])"
    env = {k: v for k, v in os.environ.items() if k != "FASTOPT_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.split()[-1]
    assert out == supported[-1]


def test_environment_variable_forces_the_portable_path():
    code = "import fastopt; print(fastopt.show_config(False)['isa'])"
    env = dict(os.environ, FASTOPT_CPU_CAPABILITY="baseline")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.split()[-1]
    assert out == "baseline"


def test_set_isa_and_threads_validate():
    with pytest.raises(ValueError, match="unknown ISA level"):
        _kernels.set_isa("sse9")
    unsupported = [l for l in _kernels.isa_levels() if not _kernels.isa_supported(l)]
    for level in unsupported:
        with pytest.raises(ValueError, match="not supported"):
            _kernels.set_isa(level)
    with pytest.raises(ValueError, match="positive"):
        fastopt.set_num_threads(0)


def test_thread_count_is_respected(threads):
    threads(1)
    assert fastopt.get_num_threads() == 1
    threads(2)
    assert fastopt.get_num_threads() == 2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastopt", *args], check=False,
                          capture_output=True, text=True, cwd=ROOT)


def test_bench_command_prints_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    res = run_cli("bench", "--optimizers", "Adam,SGD", "--sizes", "1000,3x500",
                  "--rounds", "1", "--quick", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "[1/4] Adam 1000" in res.stderr  # progress
    lines = res.stdout.splitlines()
    header = next(l for l in lines if l.startswith("optimizer"))
    for col in ("fastopt", "numpy", "GB/s", "x numpy"):
        assert col in header
    assert any(l.startswith("Adam") and "3x500" in l for l in lines)
    data = json.loads(out.read_text())
    assert [r["optimizer"] for r in data["rows"]] == ["Adam", "Adam", "SGD", "SGD"]
    row = data["rows"][1]
    assert row["elements"] == 1500 and row["tensors"] == 3
    assert row["fastopt_ns"] > 0 and row["speedup_numpy"] > 0
    assert data["config"]["isa"] == fastopt.show_config(False)["isa"]


@pytest.mark.parametrize("args,message", [
    (["bench", "--optimizers", "Nope"], "unknown optimizer"),
    (["bench", "--sizes", "abc"], "bad size"),
    (["bench", "--threads", "0"], "--threads"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_cli_rejects_bad_arguments(args, message):
    res = run_cli(*args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "usage: python -m fastopt" in res.stderr


def test_version_is_the_one_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        declared = re.search(r'^version = "([^"]+)"', f.read(), flags=re.MULTILINE).group(1)
    assert fastopt.__version__ == importlib.metadata.version("fastopt") == declared
    res = run_cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == f"fastopt {declared}"


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["bench", "--help"], ["demo", "-h"],
                                  ["config", "--help"], ["schedule", "--help"]])
def test_help_exits_0(capsys, argv):
    assert _cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fastopt")


def test_top_level_help_lists_the_commands(capsys):
    assert _cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("bench", "schedule", "demo", "config"):
        assert re.search(rf"^\s+{command}\s+\w", out, flags=re.MULTILINE), command


@pytest.mark.parametrize("argv,message", [
    (["config", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "--threads", "x"], "--threads: invalid int value: 'x'"),
    (["bench", "--rounds", "1.5"], "--rounds"),
    (["bench", "--optimizers", "adam,Nope,sgdd"], "unknown optimizer(s) Nope, sgdd"),
    (["--bogus"], "required: COMMAND"),
    (["--bogus", "config"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    assert _cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_config_command_prints_show_config(capsys):
    assert _cli.main(["config"]) == 0
    out = capsys.readouterr().out
    for key, value in fastopt.show_config(print_=False).items():
        assert re.search(rf"^{key}\s+: {re.escape(str(value))}$", out, flags=re.MULTILINE), key


def test_bench_optimizer_names_in_any_case():
    assert _cli.bench.optimizer_names("adam, SGD,LION,nadam") == ["Adam", "SGD", "Lion", "NAdam"]
    assert _cli.bench.optimizer_names("") == []


def test_bench_prints_canonical_names(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--optimizers", "adamw,RMSPROP", "--sizes", "256", "--rounds", "1",
            "--quick", "--no-torch", "--json", str(out)]
    assert _cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "[1/2] AdamW 256" in captured.err and "[2/2] RMSprop 256" in captured.err
    rows = [line.split() for line in captured.out.splitlines()]
    assert [r[:2] for r in rows if r and r[0] in ("AdamW", "RMSprop")] == [
        ["AdamW", "256"], ["RMSprop", "256"]]
    data = json.loads(out.read_text())
    assert [r["optimizer"] for r in data["rows"]] == ["AdamW", "RMSprop"]
    assert "numpy_ns" in data["rows"][0] and "torch_ns" not in data["rows"][0]


def test_bench_cases_cover_every_per_element_optimizer():
    assert list(CASES) == list(fastopt.OPTIMIZERS)


def test_bench_numpy_cases_compute_the_same_update():
    """The NumPy implementations the bench times are real implementations of the update:
    they agree with fastopt closely."""
    rng = np.random.default_rng(0)
    for name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW"):
        case = CASES[name]
        x = rng.standard_normal(100).astype(np.float32)
        arrays = [x.copy()]
        p = fastopt.Parameter(x.copy())
        opt = fastopt.OPTIMIZERS[name]([p], **case.kwargs)
        state = {}
        for t in range(1, 6):
            g = rng.standard_normal(100).astype(np.float32)
            p.grad = g
            opt.step()
            case.numpy_step(arrays, [g], state, t)
        np.testing.assert_allclose(arrays[0], np.asarray(p), rtol=1e-5, atol=1e-6)


def test_the_isa_level_is_picked_at_first_use_not_at_import():
    code = ("import os, fastopt; os.environ['FASTOPT_CPU_CAPABILITY'] = 'baseline'; "
            "print(fastopt.show_config(False)['isa'])")
    env = {k: v for k, v in os.environ.items() if k != "FASTOPT_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.split()[-1]
    assert out == "baseline"
