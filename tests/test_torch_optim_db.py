"""fastopt.torch driven by torch's own optimizer database.

torch 2.13 ships the database its optimizer tests run on,
``torch.testing._internal.common_optimizers.optim_db``: one ``OptimizerInfo`` per optimizer
with its constructor configurations (``optim_inputs_func``) and its invalid inputs
(``optim_error_inputs_func``: what must fail, with which exception, at construction or at
the step, and the message's regex). This module imports it and runs every entry that has a
``fastopt.torch`` class against ``torch.optim``, in float32 and float64:

* every configuration runs fastopt.torch and torch.optim in lockstep for 20 steps on the
  same model (two parameter groups, the second with its own ``lr``), the parameters compared
  after every step at ``torch.testing.assert_close``'s default tolerance for the dtype, and
  the state dicts at the end (group values, state keys, dtypes, shapes and values). The
  configurations are torch's CPU list with its implementation flags
  (``_get_optim_inputs_including_global_cliquey_kwargs``: all flags off, then
  ``differentiable``, and ``fused`` where torch has a CPU fused kernel), plus ``foreach=True``
  for each (torch's helper leaves it out on the CPU, where it has no foreach kernels, but
  ``torch.optim`` runs its multi-tensor code there), plus the configurations torch lists for
  CUDA only (``capturable``, tensor ``lr``, tensor ``betas``): as they are, and with
  ``capturable`` dropped. A configuration torch refuses at construction (a tensor ``lr``
  with ``foreach=True``) must be refused by fastopt.torch with the same exception and text.
  ``LBFGS`` takes one group (torch's refuses more) and is given the closure its step needs,
  and runs fewer steps (see ``STEPS``); ``SparseAdam`` is given row-sparse COO gradients
  (``_row_sparse``: a different third of the rows left out at each step); ``Muon``, which
  takes matrices only, runs on the model without its biases.
* every error input raises (or warns) with torch's exception type, at torch's phase, with a
  message matching torch's regex.
* sparse gradients and complex parameters: where torch.optim steps with them, fastopt.torch
  steps to the same values (SGD and Adagrad take sparse gradients, the per-element
  optimizers and LBFGS complex parameters); where torch raises, fastopt.torch raises the same error at
  the same point (Adafactor's step refuses complex parameters, SparseAdam's constructor
  them and its step dense gradients, the others' steps sparse gradients), naming the
  parameter, with nothing changed.

Refused by design, and asserted to be refused with a clear error:

* ``differentiable=True``: the update runs in C, outside autograd (ValueError at
  construction; torch.optim accepts it);
* ``capturable=True`` on the CPU: torch.optim raises an AssertionError at the step, and so
  does fastopt.torch, naming the group, with nothing changed;
* integer parameters, and float16 and bfloat16 ones of ``SparseAdam``, ``LBFGS``,
  ``Adafactor`` and ``Muon`` (NumPy steps in float32 and float64): TypeError at construction
  naming the parameter (torch.optim accepts them). The per-element optimizers step float16 and
  bfloat16 parameters (in float32 arithmetic, their state in their dtype); this sweep runs
  float32 and float64 only, and ``tests/test_low_precision.py`` runs the 16-bit ones in
  lockstep with torch.optim at the tolerance it states;
* LBFGS: sparse gradients (RuntimeError at the step, naming the parameter); torch.optim's
  LBFGS steps with them (its complex parameters, as their real views, step here as there).

Three documented tolerances (a tensor ``lr`` or tensor ``betas`` step as torch's, which
derives the step scalars from them in their dtype, and are compared at the default):

* the final ``momentum_buffer`` of a centered float32 RMSprop with momentum is compared at
  1e-4 (see ``STATE_TOL``); its parameters, at every step, at the default;
* the final history of a float32 LBFGS (``ro``, ``al`` and the direction ``d``) is compared
  at a relative 1e-3 (see ``HISTORY_TOL``); its parameters, at every step, at the default;
* Muon's Newton-Schulz iteration runs in bfloat16, emulated by fastopt operation by operation
  but with float32 matrix products that sum in another order (see ``MUON_TOL``): each step's
  update is compared relative to the RMS of torch's (6 %; measured at most 2.4 % here: torch's
  bfloat16 products sum in an order that depends on the CPU), the
  parameters after every step within an absolute 1.2e-3 (measured 4e-5) and the final
  momentum buffers within 1e-4 (measured 1.1e-6).

Every optimizer of the database has a fastopt.torch class (``LEFT_OUT`` is empty).

Counts per optimizer, float32 and float64 together: configurations run in lockstep;
configurations torch.optim refuses at construction, refused alike; configurations refused by
design (``differentiable=True``; ``capturable=True``, refused at the step as torch does);
error inputs checked:

=========  ========  =======  ==============  ==========  ======
optimizer  lockstep  refused  differentiable  capturable  errors
=========  ========  =======  ==============  ==========  ======
Adadelta         36        0              12           6      14
Adafactor        20        0               0           0      20
Adagrad          42        0              14           0      14
Adam             44        6              10          10      24
Adamax           40        0              10          10      14
AdamW            44        6              10          10      24
ASGD             48        0              14          10      14
LBFGS            10        0               0           0      12
Muon             14        0               0           0      18
NAdam            44        0              14           8      16
RAdam            40        0              12           8      16
RMSprop          44        0              16           6      14
Rprop            28        0              10           4      14
SGD              54        0              18           0      14
SparseAdam        8        0               0           0      20
total           516       12             140          72     248
=========  ========  =======  ==============  ==========  ======

(``test_counts_in_the_docstring`` keeps this table true.)
"""
import copy
import inspect
import re
import warnings

import pytest

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
pytest.importorskip("expecttest", reason="torch's test database imports expecttest")
from torch.testing._internal import common_optimizers as _db  # noqa: E402

import fastopt.torch as ft  # noqa: E402
from helpers import F32_TRAINED, torch_batch, torch_mlp  # noqa: E402

F32 = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing's float32 defaults
# centered RMSprop with momentum: the buffer sums g / (sqrt(v - m^2) + eps), whose
# denominator cancels where v is tiny; torch's CPU sqrt is not correctly rounded (about 0.7%
# of float32 results are one unit in the last place off), and those last bits amplify there
STATE_TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {}}
# float32 LBFGS's history scalars ro = 1 / (y . s) and al = ro (s . q), and the direction d
# made of them, take the relative error of a difference of gradients (the parameters and the
# other state: the default; prev_loss, a Python float, at the float32 default)
HISTORY_TOL = {torch.float32: {"rtol": 1e-3, "atol": 1e-5}, torch.float64: {}}
#: LBFGS's steps in lockstep (20 for the others): each runs up to max_iter = 20 iterations,
#: and on this non-convex loss L-BFGS amplifies last-bit differences from there on (float32
#: parts at the default tolerance within the second step, float64 within the sixth)
STEPS = {"LBFGS": {torch.float32: 1, torch.float64: 3}}
#: Muon's Newton-Schulz iteration runs in bfloat16: fastopt emulates torch's operations one by
#: one, but its float32 matrix products sum in another order and round to another bfloat16
#: for a few elements in ten thousand, which the iteration amplifies. Compared as in
#: tests/test_muon.py but for the update, within 6 % of the RMS of torch's (``update``;
#: measured 2.4 % here, and torch's bfloat16 products sum in a CPU-dependent order), the
#: parameters within an absolute 1.2e-3 after every step; the final momentum buffers, which
#: see the gradients of those parameters, within 1e-4 (``state``)
MUON_TOL = {"update": 0.06, "params": {"rtol": 0, "atol": 1.2e-3},
            "state": {"rtol": 0, "atol": 1e-4}}
#: the optimizers that take matrices only: their model has no biases
MATRICES_ONLY = {"Muon"}
LEFT_OUT = set()
INFOS = [info for info in _db.optim_db if info.name in ft.__all__]
DTYPES = {"f32": torch.float32, "f64": torch.float64}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tensors are tiny: torch's intra-op threads only add waits (its fused CPU kernels
    wait for them at every call, slow on a busy machine), and no result depends on them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _id(text):
    return re.sub(r"\W+", "-", text).strip("-")


def _kind(kwargs):
    if kwargs.get("differentiable"):
        return "differentiable"
    if kwargs.get("capturable"):
        return "capturable"
    return "lockstep"


def _configs(info, dtype):
    """(description, kwargs) of every configuration of ``info`` run on the CPU."""
    out = [(c.desc, c.kwargs) for c in
           _db._get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, info)]
    cpu = info.optim_inputs_func("cpu", dtype)
    for c in cpu:
        if "foreach" in info.supported_impls:
            out.append((f"{c.desc} & foreach", {**c.kwargs, "foreach": True}))
    seen = {c.desc for c in cpu}
    for c in info.optim_inputs_func("cuda", dtype):
        if c.desc in seen:
            continue
        out.append((f"{c.desc} (CUDA list)", dict(c.kwargs)))
        if "capturable" in c.kwargs:
            dropped = {k: v for k, v in c.kwargs.items() if k != "capturable"}
            out.append((f"{c.desc} (CUDA list, capturable dropped)", dropped))
            out.append((f"{c.desc} (CUDA list, capturable dropped) & foreach",
                        {**dropped, "foreach": True}))
    return out


CONFIGS = [pytest.param(info, dtype, desc, kwargs, id=f"{info.name}-{did}-{_id(desc)}")
           for info in INFOS for did, dtype in DTYPES.items()
           for desc, kwargs in _configs(info, dtype)]


def _by_kind(kind):
    return [p for p in CONFIGS if _kind(p.values[3]) == kind]


_model = torch_mlp


def _model_for(info, dtype):
    """``_model``, without biases for the optimizers of matrices (Muon)."""
    return _model(dtype, bias=info.name not in MATRICES_ONLY)


_data = torch_batch


def _groups(model, cls, kwargs):
    """The model's parameters as two groups: the first takes the defaults, the second its
    own float ``lr`` (half the configuration's); for LBFGS, which takes one group only, one."""
    if issubclass(cls, torch.optim.LBFGS):
        return [{"params": list(model.parameters())}]
    lr = kwargs.get("lr", inspect.signature(cls).parameters["lr"].default)
    return [{"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "lr": float(lr) / 2}]


def _make(cls, model, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on tensor lr and foreach
        return cls(_groups(model, cls, kwargs), **copy.deepcopy(kwargs))


def _row_sparse(grad, step):
    """``grad`` as a sparse COO tensor of the rows (first index) that an embedding's
    gradient would hold at ``step``: two rows in three, a different third left out each
    step."""
    rows = torch.arange(grad.shape[0])
    rows = rows[(rows + step) % 3 != 0]
    return torch.sparse_coo_tensor(rows[None], grad[rows], grad.shape, check_invariants=True)


def _step(model, opt, x, y, step=0):
    """One step of ``opt`` on the model's loss: LBFGS is given the closure its step needs,
    SparseAdam row-sparse gradients (``_row_sparse``)."""
    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        if isinstance(opt, torch.optim.SparseAdam):
            for p in model.parameters():
                p.grad = _row_sparse(p.grad, step)
        return loss

    if isinstance(opt, torch.optim.LBFGS):
        opt.step(closure)
    else:
        closure()
        opt.step()


def _same_value(a, b, where, **tol):
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{where}: {m}")
    elif isinstance(b, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_value(x, y, f"{where}[{i}]", **tol)
    elif isinstance(b, float):  # LBFGS's prev_loss, and its t and H_diag as numbers
        assert type(a) is float, where
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{where}: {m}")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def _same_state_dict(sd, tsd, tol, key_tol=None):
    """``tol``: the tolerance of the state values; ``key_tol``: {key: tolerance} for the keys
    that need another."""
    assert len(sd["param_groups"]) == len(tsd["param_groups"])
    for gi, (g, tg) in enumerate(zip(sd["param_groups"], tsd["param_groups"])):
        assert g.keys() == tg.keys(), gi
        for key, value in tg.items():
            _same_value(g[key], value, f"param_groups[{gi}][{key!r}]", rtol=0, atol=0)
    assert sd["state"].keys() == tsd["state"].keys()
    for i, st in tsd["state"].items():
        assert sd["state"][i].keys() == st.keys(), f"state[{i}]"
        for key, value in st.items():
            t = (key_tol or {}).get(key, tol)
            _same_value(sd["state"][i][key], value, f"state[{i}][{key!r}]", **t)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("info,dtype,desc,kwargs", _by_kind("lockstep"))
def test_db_configuration_in_lockstep_with_torch(info, dtype, desc, kwargs):
    cls = getattr(ft, info.name)
    model = _model_for(info, dtype)
    ref = copy.deepcopy(model)
    try:
        topt = _make(info.optim_cls, ref, kwargs)
    except Exception as e:  # torch refuses the configuration: so must fastopt.torch
        with pytest.raises(type(e)) as caught:
            _make(cls, model, kwargs)
        assert str(caught.value) == str(e)
        return
    opt = _make(cls, model, kwargs)
    if info.name == "Muon":  # one reference, torch as it is (it reads a tensor lr as lr)
        _muon_lockstep(model, opt, ref, topt, dtype)
        _same_state_dict(opt.state_dict(), topt.state_dict(), MUON_TOL["state"])
        return
    x, y = _data(dtype)
    # a float32 L-BFGS step is several iterations of training on torch's reductions (MKL's,
    # which sum in a CPU-dependent order)
    ptol = F32_TRAINED if info.name == "LBFGS" and dtype == torch.float32 else {}
    for step in range(STEPS.get(info.name, {}).get(dtype, 20)):
        _step(model, opt, x, y, step)
        _step(ref, topt, x, y, step)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **ptol, msg=lambda m, s=step: f"step {s}: {m}")
    sd, tsd = opt.state_dict(), topt.state_dict()
    key_tol = None
    if info.name == "RMSprop" and kwargs.get("centered") and kwargs.get("momentum"):
        key_tol = {"momentum_buffer": STATE_TOL[dtype]}
    if info.name == "LBFGS":
        key_tol = {"ro": HISTORY_TOL[dtype], "al": HISTORY_TOL[dtype], "d": HISTORY_TOL[dtype],
                   "prev_loss": F32 if dtype == torch.float32 else {}}
    _same_state_dict(sd, tsd, ptol, key_tol)


def _muon_lockstep(model, opt, ref, topt, dtype):
    """20 steps of ``opt`` and ``topt`` on their models, compared with ``MUON_TOL``."""
    x, y = _data(dtype)
    for step in range(20):
        before = [p.detach().clone() for p in model.parameters()]
        tbefore = [q.detach().clone() for q in ref.parameters()]
        _step(model, opt, x, y, step)
        _step(ref, topt, x, y, step)
        for p, q, b, tb in zip(model.parameters(), ref.parameters(), before, tbefore):
            ours, theirs = (p - b).detach(), (q - tb).detach()
            rms = theirs.pow(2).mean().sqrt()
            assert (ours - theirs).pow(2).mean().sqrt() <= MUON_TOL["update"] * rms, step
            torch.testing.assert_close(p, q, **MUON_TOL["params"],
                                       msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("info,dtype,desc,kwargs", _by_kind("differentiable"))
def test_db_differentiable_configuration_is_refused(info, dtype, desc, kwargs):
    _make(info.optim_cls, _model(dtype), kwargs)  # torch takes it
    with pytest.raises(ValueError, match="differentiable=True is not supported by "
                                         "fastopt.torch"):
        _make(getattr(ft, info.name), _model(dtype), kwargs)


@pytest.mark.parametrize("info,dtype,desc,kwargs", _by_kind("capturable"))
def test_db_capturable_configuration_is_refused_at_the_step_as_torch_does(info, dtype, desc,
                                                                          kwargs):
    x, y = _data(dtype)
    ref = _model(dtype)
    topt = _make(info.optim_cls, ref, kwargs)
    with pytest.raises(AssertionError, match="capturable=True"):
        _step(ref, topt, x, y)
    model = _model(dtype)
    opt = _make(getattr(ft, info.name), model, kwargs)
    before = [(p.detach().clone(), p._version) for p in model.parameters()]
    with pytest.raises(AssertionError, match=r"param_groups\[0\]: capturable=True"):
        _step(model, opt, x, y)
    for p, (value, version) in zip(model.parameters(), before):
        assert torch.equal(p, value) and p._version == version
    assert len(opt.state) == 0
    for group in opt.param_groups:
        group["capturable"] = False
    _step(model, opt, x, y)  # the same optimizer steps once capturable is off
    assert len(opt.state) == 4


def _error_inputs():
    out = []
    for info in INFOS:
        for did, dtype in DTYPES.items():
            for i, e in enumerate(info.optim_error_inputs_func(device="cpu", dtype=dtype)):
                desc = e.optimizer_error_input.desc
                out.append(pytest.param(info, e, id=f"{info.name}-{did}-{i}-{_id(desc)}"))
    return out


ERRORS = _error_inputs()


@pytest.mark.parametrize("info,error", ERRORS)
def test_db_error_input_raises_as_torch(info, error):
    cls = getattr(ft, info.name)
    given = error.optimizer_error_input
    at_step = error.error_on == _db.OptimizerErrorEnum.STEP_ERROR
    opt = None
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            opt = cls(given.params, **given.kwargs)
            if at_step:
                opt.step()
        return
    with pytest.raises(error.error_type, match=error.error_regex):
        opt = cls(given.params, **given.kwargs)
        if at_step:
            opt.step()
    # the phase: a step error is raised by the step of an optimizer that was built
    assert (opt is not None) == at_step


@pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
def test_sparse_gradients_step_or_raise_as_torch(info):
    """A dense gradient for the first parameter and a sparse one for the second. Where
    torch.optim steps (SGD and Adagrad), fastopt.torch steps to torch's parameters and state;
    where it raises, fastopt.torch raises its error, naming the parameter (SparseAdam's the
    dense one), with nothing changed; LBFGS, whose torch twin steps with the gradient made
    dense, refuses it by design (see fastopt.torch.LBFGS)."""
    cls = getattr(ft, info.name)

    def sparse_grads(model):
        w, b = list(model.parameters())[:2]  # the first bias, or (Muon) the second weight
        w.grad = torch.ones_like(w)
        with torch.sparse.check_sparse_tensor_invariants():
            b.grad = torch.sparse_coo_tensor([[1, 5 % b.shape[0]]],
                                             torch.ones(2, *b.shape[1:]), b.shape)
        return model

    def step(opt):
        if isinstance(opt, torch.optim.LBFGS):
            return opt.step(lambda: torch.tensor(1.0))
        return opt.step()

    ref = sparse_grads(_model_for(info, torch.float32))
    topt = info.optim_cls(ref.parameters(), lr=0.1)
    torch_error = None
    try:
        step(topt)
    except RuntimeError as e:
        torch_error = str(e)
    model = sparse_grads(_model_for(info, torch.float32))
    opt = cls(model.parameters(), lr=0.1)
    if info.name in ("SGD", "Adagrad"):
        assert torch_error is None
        step(opt)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
        _same_state_dict(opt.state_dict(), topt.state_dict(), {})
        return
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    offending = 0 if info.name == "SparseAdam" else 1
    with pytest.raises(RuntimeError,
                       match=rf"param_groups\[0\]\['params'\]\[{offending}\]: ") as caught:
        step(opt)
    if info.name == "LBFGS":
        assert torch_error is None
        assert "sparse" in str(caught.value)
    else:
        assert torch_error is not None and str(caught.value).endswith(torch_error)
    for p, value in zip(model.parameters(), before):
        assert torch.equal(p, value)
    _same_state_dict(opt.state_dict(), {"param_groups": opt.state_dict()["param_groups"],
                                        "state": state}, {"rtol": 0, "atol": 0})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64], ids=str)
@pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
def test_half_precision_and_integer_parameters_are_refused(info, dtype):
    """Refused unless the kernels step them (16-bit floats, for the per-element ones)."""
    first = (1, 3) if info.name in MATRICES_ONLY else (3,)
    params = [torch.zeros(first, requires_grad=True),
              torch.zeros(2, 2, dtype=dtype, requires_grad=dtype.is_floating_point)]
    info.optim_cls(params)  # torch takes them
    if dtype.is_floating_point and getattr(ft, info.name)._kernel is not None:
        getattr(ft, info.name)(params)
        return
    with pytest.raises(TypeError, match=rf"param_groups\[0\]\['params'\]\[1\]: .*{dtype}"):
        getattr(ft, info.name)(params)


def _complex_grads(params, step):
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
def test_complex_parameters_as_torch(info, dtype):
    """A real and a complex parameter. The per-element optimizers step as torch's for 5 steps
    (parameters after each, state dicts at the end), and LBFGS too (with a closure; its real
    parameter of the complex one's real dtype: fastopt's LBFGS takes one precision); where
    torch refuses complex parameters (SparseAdam at construction, Adafactor at the step)
    fastopt.torch raises the same error at the same point, naming the parameter at the step,
    with nothing changed."""
    def params():
        torch.manual_seed(0)
        real = dtype.to_real() if info.name == "LBFGS" else torch.float32
        return [torch.randn((1, 3) if info.name in MATRICES_ONLY else (3,), dtype=real,
                            requires_grad=True),
                torch.randn(2, 2, dtype=dtype, requires_grad=True)]
    cls = getattr(ft, info.name)
    if info.name == "LBFGS":
        _lbfgs_complex_lockstep(cls(params()), info.optim_cls(params()), dtype)
        return
    try:
        topt = info.optim_cls(params())
    except ValueError as e:  # SparseAdam
        with pytest.raises(ValueError) as caught:
            cls(params())
        assert str(caught.value) == str(e)
        return
    ours, theirs = params(), topt.param_groups[0]["params"]
    opt = cls(ours)
    for step in range(5):
        _complex_grads(ours, step)
        _complex_grads(theirs, step)
        try:
            topt.step()
        except RuntimeError as e:  # Adafactor
            before = [p.detach().clone() for p in ours]
            with pytest.raises(RuntimeError,
                               match=r"param_groups\[0\]\['params'\]\[1\]: ") as caught:
                opt.step()
            assert str(caught.value).endswith(str(e))
            assert all(torch.equal(p, b) for p, b in zip(ours, before)) and not opt.state
            return
        opt.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, msg=lambda m, s=step: f"step {s}: {m}")
    _same_state_dict(opt.state_dict(), topt.state_dict(), {})  # complex state, as torch's


def _lbfgs_complex_lockstep(opt, topt, dtype):
    """3 steps of LBFGS on a convex loss of a real and a complex parameter, as torch's."""
    def closure_of(o):
        def closure():
            o.zero_grad()
            x, z = o.param_groups[0]["params"]
            loss = ((x - 1) ** 2).sum() + ((z - 1j).abs() ** 2).sum() + (z.abs() ** 4).sum() / 4
            loss.backward()
            return loss
        return closure
    for step in range(3):
        opt.step(closure_of(opt))
        topt.step(closure_of(topt))
        for p, q in zip(opt.param_groups[0]["params"], topt.param_groups[0]["params"]):
            torch.testing.assert_close(p, q, msg=lambda m, s=step: f"step {s}: {m}")
    real = dtype.to_real()
    _same_state_dict(opt.state_dict(), topt.state_dict(), {},
                     {"ro": HISTORY_TOL[real], "al": HISTORY_TOL[real], "d": HISTORY_TOL[real],
                      "prev_loss": F32 if real == torch.float32 else {}})


def test_left_out_optimizers_have_no_fastopt_torch_class():
    names = {info.name for info in _db.optim_db}
    assert names - set(ft.__all__) == LEFT_OUT
    assert not any(hasattr(ft, name) for name in LEFT_OUT)


def test_counts_in_the_docstring():
    counts = {}
    for p in CONFIGS:
        info, dtype, desc, kwargs = p.values
        row = counts.setdefault(info.name, [0, 0, 0, 0, 0])
        kind = _kind(kwargs)
        if kind == "lockstep":
            try:
                _make(info.optim_cls, _model_for(info, dtype), kwargs)
                row[0] += 1
            except Exception:
                row[1] += 1
        else:
            row[2 if kind == "differentiable" else 3] += 1
    for p in ERRORS:
        counts[p.values[0].name][4] += 1
    counts["total"] = [sum(row[i] for row in counts.values()) for i in range(5)]
    table = {m.group(1): [int(n) for n in m.group(2).split()]
             for m in re.finditer(r"^(\w+) +((?:\d+ +){4}\d+)$", __doc__, re.M)}
    assert table == counts
