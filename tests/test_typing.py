"""fastopt is a typed package: it ships ``py.typed``, and mypy checks a user's program
against its annotations (correct calls pass, wrong ones are reported)."""
import importlib.resources
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = """
    import numpy as np
    import fastopt
    from fastopt import lr_scheduler, schedules
    from fastopt.plot import lr_trace

    w = fastopt.Parameter(np.zeros(3, dtype=np.float32))
    opt = fastopt.Adam([w], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, foreach=None)
    sgd = fastopt.SGD([{"params": [w], "lr": 0.1}], momentum=0.9, nesterov=True)
    sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    w.grad = np.ones(3, dtype=np.float32)
    loss = opt.step()
    sched.step()
    lrs: list[float] = sched.get_last_lr()
    s: schedules.Schedule = schedules.cosine_decay(0.1, 100)
    x: float = s(3)
    state: dict = opt.state_dict()
    opt.load_state_dict(state)
    fastopt.save("run.safetensors", opt, sched, extra={"epoch": 1})
    n: int = fastopt.get_num_threads()
    trace = lr_trace(sched, 10)["lr"]
    f = fastopt.LBFGS([w], lr=1, line_search_fn="strong_wolfe").step(lambda: 0.0)
"""

BAD = {
    'fastopt.Adam([w], lr="fast")': 'incompatible type "str"; expected "float"',
    "lr_scheduler.StepLR(opt)": 'Missing positional argument "step_size"',
    "count: str = fastopt.get_num_threads()": 'expression has type "int"',
    "opt.zero_grad(set_to_none=3)": 'incompatible type "int"; expected "bool"',
    "fastopt.set_num_threads(2.5)": 'incompatible type "float"; expected "int"',
}


def test_the_package_ships_py_typed():
    assert importlib.resources.files("fastopt").joinpath("py.typed").is_file()
    assert os.path.isfile(os.path.join(ROOT, "src", "fastopt", "py.typed"))


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy (the typecheck extra) is not installed")
def test_mypy_checks_a_program_against_the_annotations(tmp_path):
    program = textwrap.dedent(GOOD)
    bad_lines = list(BAD)
    program += "\n".join(["", "# errors:", *bad_lines, ""])
    (tmp_path / "user.py").write_text(program)
    env = dict(os.environ, MYPYPATH=os.path.join(ROOT, "src"))
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--config-file=",
                        "--cache-dir", str(tmp_path / "cache"), "--follow-imports=silent",
                        "user.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    first_bad = program.splitlines().index(bad_lines[0]) + 1
    reported = {}
    for line in r.stdout.splitlines():
        if line.startswith("user.py:") and ": error:" in line:
            reported.setdefault(int(line.split(":")[1]), []).append(line)
    good_errors = [e for n, errs in reported.items() if n < first_bad for e in errs]
    assert not good_errors, "\n".join(good_errors) + "\n" + r.stderr
    for k, (code, message) in enumerate(BAD.items()):
        errors = " ".join(reported.get(first_bad + k, []))
        assert message in errors, (code, errors or r.stdout + r.stderr)
