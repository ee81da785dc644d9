"""``python -m fastopt bench --low-precision``: its state accounting, its ratios, its verdicts on
the targets and a tiny run of the command (speed itself is never asserted)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from fastopt._cli import low_precision as lp


def test_state_bytes_count_arrays_and_tensors():
    n = 1000
    state = {"step": np.array(3.0, np.float32), "exp_avg": np.zeros(n, np.float32),
             "exp_avg_sq": np.zeros(n, np.float16), "lr": 0.1, "count": 7}
    assert lp.state_nbytes(state) == 4 + 4 * n + 2 * n
    torch = pytest.importorskip("torch")
    state = {"step": torch.tensor(1.0), "state1": torch.zeros(n, dtype=torch.uint8),
             "absmax1": torch.zeros(4), "step_int": 5}
    assert lp.state_nbytes(state) == 4 + n + 16


def test_the_built_optimizers_report_their_state():
    n = 5000
    step, state = lp.build("fp32", n)
    step()
    assert lp.state_nbytes(state()) == 8 * n + 4  # exp_avg, exp_avg_sq, a float32 step
    pytest.importorskip("torch")
    step, state = lp.build("torch", n)
    step()
    assert lp.state_nbytes(state()) == 8 * n + 4


def test_torchao_runs_whole_blocks():
    assert lp.elements_for("torchao", 1_000_000) == 1_000_192
    assert lp.elements_for("torchao", 512) == 512
    assert lp.elements_for("int8", 1_000_000) == 1_000_000


def test_summarize_pairs_the_rounds():
    med, ratio, lo, hi = lp.summarize([2.0, 3.0, 9.0], [1.0, 2.0, 3.0, 4.0])
    assert med == 3.0
    assert (ratio, lo, hi) == (2.0, 1.5, 3.0)  # 2/1, 3/2, 9/3; the fourth base round unpaired


def _row(config, ns, ratio, threads=1, n=100_000_000, peak=0):
    state = {"fp32": 8.0, "bf16": 4.0, "int8": 2.03125}.get(config, 2.05)
    return {"config": config, "name": lp.CONFIGS[config], "elements": n, "threads": threads,
            "ns": ns, "ratio": ratio, "ratio_min": ratio, "ratio_max": ratio,
            "state_bytes_per_param": state, "state_bytes": state * n, "peak_bytes": peak}


def test_the_targets_are_judged_from_the_rows():
    rows = [_row("fp32", 3.0, 1.0), _row("int8", 2.1, 0.70), _row("bf16", 2.7, 0.90),
            _row("bnb", 100.0, 33.0), _row("fp32", 2.0, 1.0, threads=2),
            _row("int8", 1.5, 0.75, threads=2)]
    got = {text: verdict for text, verdict, _ in lp.check_targets(rows)}
    assert got == {lp.TARGETS[0]: "met", lp.TARGETS[1]: "met", lp.TARGETS[2]: "n/a",
                   lp.TARGETS[3]: "NOT met", lp.TARGETS[4]: "NOT met", lp.TARGETS[5]: "met",
                   lp.TARGETS[6]: "met"}
    # a rival skipped at 1e8 is compared per element at the largest size it ran
    rows += [_row("torchao", 40.0, 13.0, n=10_000_000), _row("int8", 2.0, 0.7, n=10_000_000)]
    rows[1]["peak_bytes"] = 2 * rows[1]["state_bytes"]
    verdicts = {text: (verdict, detail) for text, verdict, detail in lp.check_targets(rows)}
    assert verdicts[lp.TARGETS[2]] == ("NOT met", "20x at 1e+07 (40.0 against 2.00 ns/elem)")
    assert verdicts[lp.TARGETS[6]][0] == "NOT met"


def test_the_cli_option_prints_the_table(tmp_path):
    out = tmp_path / "lp.json"
    configs = ["fp32", "bf16", "int8"]
    try:
        import torch  # noqa: F401
        configs.append("torch")
    except ImportError:
        pass
    res = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--low-precision", "--quick",
                          "--sizes", "2e4", "--rounds", "1", "--configs", ",".join(configs),
                          "--json", str(out)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    for column in ("ns/elem", "B/elem", "state B/p", "peak+ MB", "x fp32", "min..max"):
        assert column in res.stdout
    assert "CPU:" in res.stdout and "targets (at 2e+04 elements):" in res.stdout
    data = json.loads(out.read_text())
    rows = {(r["config"], r["threads"]): r for r in data["rows"]}
    n = 20000
    have = {c for c, _ in rows}
    assert ("fp32", 1) in rows
    expected = {"fp32": 8 * n + 4, "torch": 8 * n + 4,
                # two bfloat16 moments; two uint8 moments with a float32 scale per 256
                "bf16": 4 * n + 4, "int8": 2 * n + 2 * 4 * math.ceil(n / 256) + 4}
    for (config, threads), r in rows.items():
        assert r["state_bytes"] == expected[config], config
        assert r["bytes_per_elem"] == pytest.approx(12 + 2 * expected[config] / n)
        assert r["ns"] > 0 and r["rounds"] == 1
        assert r["ratio"] == pytest.approx(1.0) if config == "fp32" else r["ratio"] > 0
    if lp.fastopt_has_state_dtype():
        assert {"bf16", "int8"} <= have
    else:
        assert "this fastopt's Adam has no state_dtype" in res.stdout
