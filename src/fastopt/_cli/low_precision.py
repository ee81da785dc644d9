"""``python -m fastopt bench --low-precision``: Adam with compressed state against float32 state.

One Adam step on float32 parameters (lr 1e-3, torch's other defaults) of one tensor of N
elements, for each configuration:

==================  =========================================================================
``fp32``            fastopt.Adam on NumPy arrays, float32 state
``bf16``            fastopt.Adam, ``state_dtype="bfloat16"``
``int8``            fastopt.Adam, ``state_dtype="int8"`` (8-bit block-wise state)
``torch``           torch.optim.Adam(fused=True), float32 state
``bnb``             bitsandbytes' Adam8bit on CPU tensors
``torchao``         torchao's AdamW8bit (weight_decay=0) on CPU tensors
==================  =========================================================================

Each configuration lives in its own worker process (``python -m fastopt._cli.low_precision
--worker``), so that its memory is its own; the controller keeps one worker per configuration
alive for a size and asks them in turn, round after round, to time a few steps with 1 thread
and with all threads, so that the noise of a shared machine hits them alike. A round's time
is the median of its single steps; the table gives the median over the rounds and the
ratio to fastopt's float32 state in the same round (median and min..max over the rounds).
bitsandbytes and torchao are slow on the CPU: they run fewer rounds (3) of at most 5 steps
(one where a step takes over 0.2 s), and a size whose step they would take longer than
``SLOW_LIMIT_S`` for (predicted from the size before) is skipped for them, saying so.

Columns:

* ns/elem: the median step time per element;
* B/elem: the bytes a step moves per element, from the layout: the parameter read and
  written (8), the gradient read (4), and the state read and written (twice its size);
  float32 Adam moves 28, bfloat16 state 20, 8-bit state 16 plus the block scales;
* state B/p: the bytes of the optimizer's state arrays (measured: every tensor or array in
  its state, a tensor subclass's inner tensors included) per parameter element;
* peak+ MB: the most the process's resident memory rose during a timed step above what it
  held before the step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
  minus ``VmRSS`` before), the largest over the rounds: memory the step allocates beyond
  the persistent state;
* x fp32: the ratio to fastopt with float32 state at the same size and thread count.

The fastopt configurations that this build lacks (an Adam without ``state_dtype``) and the
rivals that are not installed or fail on this machine are left out, with the reason.
"""
import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

__all__ = ["CONFIGS", "TARGETS", "check_targets", "cpu_info", "format_table", "run",
           "state_nbytes", "summarize"]

#: the configurations in table order: name -> description
CONFIGS = {
    "fp32": "fastopt fp32 state",
    "bf16": "fastopt bf16 state",
    "int8": "fastopt 8-bit state",
    "torch": "torch fused fp32",
    "bnb": "bnb Adam8bit",
    "torchao": "torchao AdamW8bit",
}
#: the configurations that are timed with fewer and shorter rounds
SLOW = ("bnb", "torchao")
#: a size is skipped for a slow configuration whose step there is predicted to take longer
SLOW_LIMIT_S = 30.0
DEFAULT_SIZES = ["1e6", "1e7", "1e8"]
QUICK_SIZES = ["1e5", "1e6"]
#: the project's targets, at 1e8 elements, float32 parameters; see check_targets
TARGETS = (
    "8-bit state, 1 thread: <= 0.75 x fastopt fp32 time",
    "8-bit state: >= 30x faster than bitsandbytes' CPU Adam8bit (1 thread)",
    "8-bit state: >= 30x faster than torchao's CPU AdamW8bit (1 thread)",
    "8-bit state, 2 threads: <= 0.70 x fastopt fp32 time (2 threads)",
    "bf16 state, 1 thread: <= 0.85 x fastopt fp32 time",
    "8-bit state: <= 2.05 state bytes per parameter",
    "bf16 and 8-bit state: peak memory during a step <= the persistent state",
)
LR = 1e-3
#: the prefix of a worker's replies on its stdout
_REPLY = "fastopt-lp-reply "


# ---- the worker: one configuration, in a process of its own ----------------------------------

def fastopt_has_state_dtype():
    """Whether fastopt.Adam takes ``state_dtype`` (compressed state): tried on a tiny
    parameter, since a wrapped constructor's signature need not list it."""
    import fastopt
    try:
        fastopt.Adam([fastopt.Parameter(np.zeros(4, np.float32))], state_dtype="int8")
    except TypeError:
        return False
    return True


def state_nbytes(state):
    """The bytes of every array and tensor in an optimizer's per-parameter state dict.

    NumPy arrays count their ``nbytes``; torch tensors ``numel() * element_size()``, and a
    tensor subclass that flattens into inner tensors (``__tensor_flatten__``, as torchao's
    8-bit state does) counts those instead. Python numbers count nothing.
    """
    total = 0
    for value in state.values():
        total += _nbytes(value)
    return total


def _nbytes(value):
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    flatten = getattr(value, "__tensor_flatten__", None)
    if flatten is not None and type(value).__name__ != "Tensor":
        names, _ = flatten()
        return sum(_nbytes(getattr(value, name)) for name in names)
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.numel()) * int(value.element_size())
    if isinstance(value, dict):
        return state_nbytes(value)
    return 0


def elements_for(config, n):
    """The tensor size a configuration runs for ``n``: ``n``, except torchao's, rounded up
    to a multiple of its block of 256 (torchao keeps float32 state for other sizes)."""
    return -(-n // 256) * 256 if config == "torchao" else n


def build(config, n, seed=0):
    """One Adam over a float32 tensor of ``n`` elements with a fixed gradient.

    Returns ``(step, state)``: ``step()`` takes one step; ``state()`` returns the state dict
    of the parameter (after the first step).
    """
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)
    if config in ("fp32", "bf16", "int8"):
        import fastopt
        kwargs = {} if config == "fp32" else {
            "state_dtype": "bfloat16" if config == "bf16" else "int8"}
        p = fastopt.Parameter(data)
        p.grad = grad
        opt = fastopt.Adam([p], lr=LR, **kwargs)
        return opt.step, lambda: opt.state[p]
    import torch
    t = torch.nn.Parameter(torch.from_numpy(data))
    t.grad = torch.from_numpy(grad)
    if config == "torch":
        opt = torch.optim.Adam([t], lr=LR, fused=True)
    elif config == "bnb":  # optional rivals, imported by name (neither ships types)
        bnb = importlib.import_module("bitsandbytes")
        opt = bnb.optim.Adam8bit([t], lr=LR)
    elif config == "torchao":
        adamw8bit = importlib.import_module("torchao.optim").AdamW8bit
        opt = adamw8bit([t], lr=LR, weight_decay=0.0)
    else:
        raise ValueError(f"unknown configuration {config!r}")
    return opt.step, lambda: opt.state[t]


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak():
    """Reset VmHWM to the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _set_threads(k):
    import fastopt
    fastopt.set_num_threads(k)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(k)


def _time_round(step, reps):
    """Times of ``reps`` single steps, and the memory peak above the resident size before."""
    rss = _status_kb("VmRSS")
    can_reset = _reset_peak()
    times = []
    clock = time.perf_counter
    for _ in range(reps):
        t0 = clock()
        step()
        times.append(clock() - t0)
    hwm = _status_kb("VmHWM")
    peak = (hwm - rss) * 1024 if can_reset and hwm is not None and rss is not None else None
    return times, peak


def worker(config, n, reply):
    """Serve one configuration: set up, then answer ``time`` commands from stdin."""
    try:
        _set_threads(1)
        n = elements_for(config, n)
        step, state = build(config, n)
        t0 = time.perf_counter()
        step()  # creates the state
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        step()  # past any compilation or first-touch cost of the first step
        second = time.perf_counter() - t0
        info = {"ok": True, "elements": n, "state_bytes": state_nbytes(state()),
                "first_s": first, "step_s": second, "versions": _versions(config),
                "state_keys": {k: f"{type(v).__name__} {getattr(v, 'dtype', '')}".strip()
                               for k, v in state().items()}}
    except Exception as e:  # the rival is missing or fails here: the controller says why
        info = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    reply(info)
    if not info["ok"]:
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        _set_threads(cmd["threads"])
        times, peak = _time_round(step, cmd["reps"])
        reply({"times": times, "peak": peak})


def _versions(config):
    out = {}
    for name in {"fp32": ["fastopt"], "bf16": ["fastopt"], "int8": ["fastopt"],
                 "torch": ["torch"], "bnb": ["bitsandbytes", "torch"],
                 "torchao": ["torchao", "torch"]}[config]:
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod else None
    return out


def _worker_main(argv):
    ap = argparse.ArgumentParser(prog="python -m fastopt._cli.low_precision")
    ap.add_argument("--worker", required=True, choices=list(CONFIGS))
    ap.add_argument("--elements", type=int, required=True)
    args = ap.parse_args(argv)
    # replies go to the original stdout; anything a library prints goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        out.write(_REPLY + json.dumps(obj) + "\n")
        out.flush()
    worker(args.worker, args.elements, reply)


# ---- the controller ---------------------------------------------------------------------------

class _Worker:
    def __init__(self, config, n):
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastopt._cli.low_precision", "--worker", config,
             "--elements", str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def read(self):
        # whatever else reaches the worker's stdout (an editable build's messages on import,
        # before the worker moves stdout aside) goes on to stderr
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY):])
            sys.stderr.write(line)
        return {"ok": False, "error": f"the worker exited with status {self.proc.wait()}"}

    def time(self, threads, reps):
        self.proc.stdin.write(json.dumps({"cmd": "time", "threads": threads,
                                          "reps": reps}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def summarize(samples, base):
    """Median of a configuration's round times, and its ratios to ``base`` round by round.

    ``samples`` and ``base`` are lists of per-round times (``base`` at least as long);
    returns ``(median, ratio_median, ratio_min, ratio_max)``.
    """
    ratios = [s / b for s, b in zip(samples, base)]
    return (statistics.median(samples), statistics.median(ratios), min(ratios), max(ratios))


def _reps(step_s, target, slow):
    if slow:
        return 1 if step_s > 0.2 else max(1, min(5, int(target / max(step_s, 1e-9))))
    return max(3, min(200, int(target / max(step_s, 1e-9))))


def run(sizes, configs, thread_counts, rounds, target=0.3, slow_rounds=3, log=None):
    """Time every configuration at every size and thread count, interleaved.

    ``sizes`` are ``(label, n)`` pairs. Returns ``(rows, notes)``: one row per size, thread
    count and configuration that ran (dicts with size, elements, threads, config, name,
    ns, ratio, ratio_min, ratio_max, rounds, reps, state_bytes_per_param, bytes_per_elem,
    peak_bytes, state_bytes), and the reasons for the configurations left out.
    """
    log = log or (lambda text: None)
    rows, notes = [], []
    slow_ns = {}  # a slow configuration's ns per element at the size before
    for label, n in sizes:
        workers, infos = {}, {}
        try:
            for c in configs:
                if c in SLOW and c in slow_ns and slow_ns[c] * n * 1e-9 > SLOW_LIMIT_S:
                    notes.append(f"{CONFIGS[c]} at {label}: skipped, a step would take about "
                                 f"{slow_ns[c] * n * 1e-9:.0f} s (> {SLOW_LIMIT_S:.0f} s)")
                    continue
                log(f"{label}: setting up {CONFIGS[c]} ...")
                w = _Worker(c, n)
                info = w.read()
                if not info.get("ok"):
                    w.close()
                    notes.append(f"{CONFIGS[c]} at {label}: left out ({info.get('error')})")
                    continue
                workers[c], infos[c] = w, info
                if info["elements"] != n:
                    notes.append(f"{CONFIGS[c]} at {label}: {info['elements']} elements, the "
                                 "next multiple of 256 (its 8-bit state needs one)")
            if "fp32" not in workers:
                notes.append(f"{label}: no fastopt fp32 run, no ratios")
            reps = {c: _reps(infos[c]["step_s"], target, c in SLOW) for c in workers}
            nrounds = {c: (min(rounds, slow_rounds) if c in SLOW else rounds) for c in workers}
            times = {(c, k): [] for c in workers for k in thread_counts}
            peaks = {(c, k): [] for c in workers for k in thread_counts}
            order = [(c, k) for k in thread_counts for c in workers]
            for r in range(rounds):
                log(f"{label}: round {r + 1}/{rounds}")
                for c, k in (order if r % 2 == 0 else order[::-1]):
                    if r >= nrounds[c]:
                        continue
                    res = workers[c].time(k, reps[c])
                    if "times" not in res:
                        raise RuntimeError(f"{CONFIGS[c]} at {label}: {res.get('error')}")
                    times[(c, k)].append(statistics.median(res["times"]))
                    peaks[(c, k)].append(res["peak"])
            for k in thread_counts:
                for c in workers:
                    ts = times[(c, k)]
                    base = times.get(("fp32", k))
                    med = statistics.median(ts)
                    sb, m = infos[c]["state_bytes"], infos[c]["elements"]
                    if base:  # per element, where the tensor has another size
                        _, rm, rlo, rhi = summarize([t * n / m for t in ts], base)
                    else:
                        rm = rlo = rhi = None
                    known = [p for p in peaks[(c, k)] if p is not None]
                    rows.append({
                        "size": label, "elements": n, "tensor_elements": m, "threads": k,
                        "config": c, "name": CONFIGS[c], "ns": med / m * 1e9, "ratio": rm,
                        "ratio_min": rlo, "ratio_max": rhi, "rounds": len(ts),
                        "reps": reps[c], "state_bytes": sb, "state_bytes_per_param": sb / m,
                        "bytes_per_elem": 12 + 2 * sb / m,
                        "peak_bytes": max(known) if known else None,
                        "first_step_s": infos[c]["first_s"],
                        "state_keys": infos[c]["state_keys"],
                        "versions": infos[c]["versions"]})
                    if c in SLOW and k == thread_counts[0]:
                        slow_ns[c] = med / m * 1e9
        finally:
            for w in workers.values():
                w.close()
    return rows, notes


def _row(rows, size, threads, config):
    for r in rows:
        if r["elements"] == size and r["threads"] == threads and r["config"] == config:
            return r
    return None


def check_targets(rows, size=100_000_000):
    """The project's targets (``TARGETS``) against the rows: ``(target, verdict, detail)``.

    The verdict is ``"met"``, ``"NOT met"`` or ``"n/a"`` (a configuration or size missing).
    Times are compared at ``size`` elements; a rival skipped there is compared at the
    largest size it ran, per element.
    """
    out = []

    def ratio_target(text, config, threads, limit):
        r = _row(rows, size, threads, config)
        if r is None or r["ratio"] is None:
            out.append((text, "n/a", f"no {CONFIGS[config]} run at {size:.0e}, {threads} "
                                     "thread(s)"))
            return
        ok = r["ratio"] <= limit
        out.append((text, "met" if ok else "NOT met",
                    f"{r['ratio']:.2f} ({r['ratio_min']:.2f}..{r['ratio_max']:.2f})"))

    def rival_target(text, rival):
        mine = [r for r in rows if r["config"] == "int8" and r["threads"] == 1]
        theirs = [r for r in rows if r["config"] == rival and r["threads"] == 1]
        if not mine or not theirs:
            out.append((text, "n/a", f"no {CONFIGS['int8' if not mine else rival]} run"))
            return
        at = max(r["elements"] for r in theirs)
        at = size if any(r["elements"] == size for r in theirs) else at
        a, b = _row(rows, at, 1, "int8"), _row(rows, at, 1, rival)
        if a is None:
            out.append((text, "n/a", f"no 8-bit run at {at:.0e}"))
            return
        x = b["ns"] / a["ns"]
        out.append((text, "met" if x >= 30 else "NOT met",
                    f"{x:.0f}x at {at:.0e} ({b['ns']:.1f} against {a['ns']:.2f} ns/elem)"))

    ratio_target(TARGETS[0], "int8", 1, 0.75)
    rival_target(TARGETS[1], "bnb")
    rival_target(TARGETS[2], "torchao")
    ratio_target(TARGETS[3], "int8", 2, 0.70)
    ratio_target(TARGETS[4], "bf16", 1, 0.85)
    eights = [r for r in rows if r["config"] == "int8" and r["elements"] == size]
    if eights:
        b = eights[0]["state_bytes_per_param"]
        out.append((TARGETS[5], "met" if b <= 2.05 else "NOT met", f"{b:.4f} B/param"))
    else:
        out.append((TARGETS[5], "n/a", f"no 8-bit run at {size:.0e}"))
    mine = [r for r in rows if r["config"] in ("bf16", "int8") and r["elements"] == size]
    if not mine or any(r["peak_bytes"] is None for r in mine):
        out.append((TARGETS[6], "n/a", "no compressed-state run with a measured peak at "
                                       f"{size:.0e}"))
    else:
        worst = max(mine, key=lambda r: r["peak_bytes"] / r["state_bytes"])
        ok = all(r["peak_bytes"] <= r["state_bytes"] for r in mine)
        out.append((TARGETS[6], "met" if ok else "NOT met",
                    f"largest: {worst['name']}, {worst['threads']} thread(s): "
                    f"{worst['peak_bytes'] / 2**20:.1f} MB against "
                    f"{worst['state_bytes'] / 2**20:.1f} MB of state"))
    return out


def _f(x, spec, width):
    return "-".rjust(width) if x is None else format(x, spec).rjust(width)


def format_table(rows):
    """The table: one line per size, thread count and configuration."""
    head = (f"{'size':>5} {'thr':>3} {'configuration':<20} {'ns/elem':>8} {'B/elem':>7} "
            f"{'GB/s':>6} {'state B/p':>9} {'peak+ MB':>8} {'x fp32':>6} {'min..max':>11} "
            f"{'rounds':>6}")
    out = [head, "-" * len(head)]
    for r in rows:
        gbs = r["bytes_per_elem"] / r["ns"]
        spread = ("-" if r["ratio_min"] is None
                  else f"{r['ratio_min']:.2f}..{r['ratio_max']:.2f}")
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        out.append(f"{r['size']:>5} {r['threads']:>3} {r['name']:<20} {r['ns']:8.3f} "
                   f"{r['bytes_per_elem']:7.2f} {gbs:6.1f} {r['state_bytes_per_param']:9.4f} "
                   f"{_f(peak, '.1f', 8)} {_f(r['ratio'], '.2f', 6)} {spread:>11} "
                   f"{r['rounds']:>6}")
    return "\n".join(out)


def cpu_info():
    """The CPU model and its vector ISA, from lscpu (or /proc/cpuinfo), with fastopt's level."""
    import fastopt
    model, flags = None, ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", text, re.MULTILINE)
        model = m.group(1).strip() if m else None
        m = re.search(r"^Flags:\s*(.+)$", text, re.MULTILINE)
        flags = m.group(1) if m else ""
    except (OSError, subprocess.CalledProcessError):
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
            m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
            model = m.group(1).strip() if m else None
            m = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
            flags = m.group(1) if m else ""
        except OSError:
            pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
              "avx512_fp16", "amx_bf16", "amx_int8")
    have = set(flags.split())
    cfg = fastopt.show_config(print_=False)
    return {"model": model, "isa_flags": [f for f in wanted if f in have],
            "fastopt_isa": cfg["isa"], "cpus": os.cpu_count()}


def parse_configs(text):
    """'fp32,int8' -> ['fp32', 'int8'], in table order."""
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    return [c for c in CONFIGS if c in names]


def _available(configs, notes):
    import importlib.util
    keep = []
    for c in configs:
        if c in ("bf16", "int8") and not fastopt_has_state_dtype():
            notes.append(f"{CONFIGS[c]}: left out, this fastopt's Adam has no state_dtype")
            continue
        module = {"torch": "torch", "bnb": "bitsandbytes", "torchao": "torchao"}.get(c)
        if module and importlib.util.find_spec(module) is None:
            notes.append(f"{CONFIGS[c]}: left out, {module} is not installed")
            continue
        keep.append(c)
    return keep


def main(sizes, configs=None, threads=None, rounds=5, quick=False, json_path=None,
         out=print, log=None):
    """Run the benchmark and print the table, the notes and the targets; returns 0.

    ``sizes`` are ``(label, n)`` pairs; ``threads`` the thread counts (default 1 and every
    CPU); ``configs`` a list of ``CONFIGS`` keys (default all).
    """
    import fastopt
    notes = []
    configs = _available(list(CONFIGS) if configs is None else configs, notes)
    counts = threads or sorted({1, os.cpu_count() or 1})
    info = cpu_info()
    out(f"fastopt {fastopt.__version__}, Adam on float32 parameters, one tensor; CPU: "
        f"{info['model']} ({info['cpus']} CPUs), ISA flags {' '.join(info['isa_flags'])}, "
        f"fastopt's level {info['fastopt_isa']}")
    rows, more = run(sizes, configs, counts, rounds, target=0.03 if quick else 0.3,
                     slow_rounds=1 if quick else 3, log=log)
    notes += more
    versions = {}
    for r in rows:
        versions.update({k: v for k, v in r["versions"].items() if v})
    out("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    out(f"rounds interleaved over the configurations and thread counts ({rounds}; the slow "
        f"rivals {min(rounds, 1 if quick else 3)}), time = median over rounds of each round's "
        "median step")
    out(format_table(rows))
    for note in notes:
        out(f"note: {note}")
    biggest = max((n for _, n in sizes), default=0)
    verdicts = check_targets(rows, size=biggest)
    out(f"targets (at {biggest:.0e} elements):")
    for text, verdict, detail in verdicts:
        out(f"  [{verdict}] {text}: {detail}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"cpu": info, "config": fastopt.show_config(print_=False),
                       "versions": versions, "rows": rows, "notes": notes,
                       "targets": verdicts}, f, indent=1)
        out(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
