"""fastopt.torch with the torch ecosystem: the real packages, no stand-ins.

Each test trains one tiny model twice, once with a ``torch.optim`` optimizer and once with
its ``fastopt.torch`` twin, under the same tool (torch's schedulers, ``swa_utils``,
``GradScaler``, ``clip_grad_norm_``, optimizer-in-backward hooks,
``torch.distributed.checkpoint``, Lightning, the transformers ``Trainer``, accelerate), and
compares the weights within torch's float32 tolerance at every step, or at every step the
tool reports where the tool owns the loop. Checkpoints written by the tools load back
(``weights_only`` loading included) and a resumed run ends with the weights of the
uninterrupted one, bit for bit.

Lightning, transformers and accelerate are optional (the ``integrations`` extra): their tests
skip without them.
"""
import copy

import pytest

torch = pytest.importorskip("torch", reason="fastopt.torch needs torch")
import fastopt.torch as ft  # noqa: E402
from helpers import F32_TRAINED  # noqa: E402

F32 = {"rtol": 1.3e-6, "atol": 1e-5}  # torch.testing's float32 defaults
lr_scheduler = torch.optim.lr_scheduler


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _loss(model, x, y):
    return (model(x) - y).pow(2).mean()


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = _loss(model, x, y)
    loss.backward()
    opt.step()
    return loss.item()


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_weights(mine, ref, where):
    """Two models' weights (or two lists of weight snapshots) agree within float32 tolerance."""
    mine = list(mine.parameters()) if isinstance(mine, torch.nn.Module) else mine
    ref = list(ref.parameters()) if isinstance(ref, torch.nn.Module) else ref
    assert len(mine) == len(ref) and len(mine) > 0, where
    for i, (p, q) in enumerate(zip(mine, ref)):
        torch.testing.assert_close(p, q, **F32, msg=lambda m, i=i: f"{where}, tensor {i}: {m}")


def _assert_history(mine, ref):
    """Two runs' weight snapshots, one per step, agree step by step."""
    assert len(mine) == len(ref) and len(mine) > 0
    for step, (a, b) in enumerate(zip(mine, ref)):
        _assert_weights(a, b, f"step {step + 1}")


def _pair(name, kwargs, seed=0):
    """A model and a fastopt.torch optimizer, and an identical model with torch's."""
    model = _model(seed)
    ref = copy.deepcopy(model)
    return model, getattr(ft, name)(model.parameters(), **kwargs), ref, getattr(
        torch.optim, name)(ref.parameters(), **kwargs)


# -- torch's schedulers -------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,key", [
    ("Adam", {"lr": 0.01}, "betas"),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, "betas"),
    ("NAdam", {"lr": 0.01}, "betas"),
    ("RAdam", {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}, "betas"),
    ("Adamax", {"lr": 0.01}, "betas"),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}, "momentum"),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}, "momentum"),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True}, "momentum"),
], ids=["Adam", "AdamW-amsgrad", "NAdam", "RAdam", "Adamax", "SGD-nesterov", "SGD-dampening",
        "RMSprop-centered"])
@pytest.mark.parametrize("three_phase", [False, True], ids=["two-phase", "three-phase"])
def test_one_cycle_lr_cycles_the_momentum_the_step_uses(name, kwargs, key, three_phase):
    """OneCycleLR rewrites ``betas[0]`` (Adam family) or ``momentum`` (SGD, RMSprop) every
    step; the C step reads the new value each time, as torch's step does."""
    model, opt, ref, topt = _pair(name, kwargs)
    make = lambda o: lr_scheduler.OneCycleLR(  # noqa: E731
        o, max_lr=0.05, total_steps=10, pct_start=0.3, base_momentum=0.5, max_momentum=0.95,
        anneal_strategy="linear", three_phase=three_phase)
    sched, tsched = make(opt), make(topt)
    x, y = _data()
    seen = []
    for step in range(10):
        group = opt.param_groups[0]
        seen.append(group[key] if key == "momentum" else group[key][0])
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
        _assert_weights(model, ref, f"step {step + 1}")
        if step < 9:  # the tenth is the last of total_steps
            sched.step()
            tsched.step()
        assert opt.param_groups[0][key] == topt.param_groups[0][key]
        assert sched.get_last_lr() == tsched.get_last_lr()
    # the momentum really moved, over its whole range
    assert min(seen) == pytest.approx(0.5) and max(seen) == pytest.approx(0.95) and len(seen) > 2
    sd = opt.state_dict()
    for i, st in topt.state_dict()["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(sd["state"][i][k], v, **F32_TRAINED)


def _sequential(o):
    return lr_scheduler.SequentialLR(o, [
        lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
        lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=1e-3)], milestones=[4])


def _chained(o):
    return lr_scheduler.ChainedScheduler([
        lr_scheduler.ExponentialLR(o, gamma=0.9),
        lr_scheduler.MultiStepLR(o, milestones=[3, 7], gamma=0.5),
        lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + 0.1 * k))])


def _cyclic(o):
    return lr_scheduler.CyclicLR(o, base_lr=0.005, max_lr=0.05, step_size_up=3,
                                 mode="triangular2", base_momentum=0.8, max_momentum=0.95,
                                 cycle_momentum="momentum" in o.defaults or "betas" in o.defaults)


@pytest.mark.parametrize("make", [_sequential, _chained, _cyclic],
                         ids=["SequentialLR", "ChainedScheduler", "CyclicLR"])
@pytest.mark.parametrize("name,kwargs", [
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("Adam", {"lr": 0.05}),
    ("Adagrad", {"lr": 0.05}),
], ids=["SGD", "Adam", "Adagrad"])
def test_composed_schedulers_drive_fastopt_torch_in_lockstep(name, kwargs, make):
    model, opt, ref, topt = _pair(name, kwargs)
    sched, tsched = make(opt), make(topt)
    x, y = _data()
    lrs = []
    for step in range(12):
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
        _assert_weights(model, ref, f"step {step + 1}")
        sched.step()
        tsched.step()
        assert sched.get_last_lr() == tsched.get_last_lr()
        assert opt.param_groups[0].get("momentum") == topt.param_groups[0].get("momentum")
        assert opt.param_groups[0].get("betas") == topt.param_groups[0].get("betas")
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) >= 6  # the schedule changed the lr
    # the scheduler's state dict moves to a resumed run of the other library
    resumed = make(topt)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.get_last_lr() == sched.get_last_lr()


def test_reduce_lr_on_plateau_on_the_real_loss_with_two_groups():
    """Driven by the training loss itself (improvements, a plateau, cooldown, min_lr per
    group), so the weights and the schedule depend on each other."""
    model = _model()
    ref = copy.deepcopy(model)

    def groups(m):
        return [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.2}]

    opt = ft.SGD(groups(model), lr=0.5, momentum=0.5)
    topt = torch.optim.SGD(groups(ref), lr=0.5, momentum=0.5)
    make = lambda o: lr_scheduler.ReduceLROnPlateau(  # noqa: E731
        o, mode="min", factor=0.5, patience=1, threshold=0.05, cooldown=1,
        min_lr=[0.1, 0.05])
    sched, tsched = make(opt), make(topt)
    x, y = _data()
    for step in range(16):
        loss, tloss = _step(model, opt, x, y), _step(ref, topt, x, y)
        _assert_weights(model, ref, f"step {step + 1}")
        sched.step(loss)
        tsched.step(tloss)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in topt.param_groups]
    assert opt.param_groups[0]["lr"] < 0.5  # the plateau was reached and the lr reduced


@pytest.mark.parametrize("name,kwargs", [("SGD", {"lr": 0.1, "momentum": 0.9}),
                                         ("AdamW", {"lr": 0.02})], ids=["SGD", "AdamW"])
def test_swa_with_swalr_and_averaged_model(name, kwargs):
    """The stochastic weight averaging recipe: a cosine schedule, then SWALR from step 6 on
    and an AveragedModel (and an EMA one) updated after each step."""
    model, opt, ref, topt = _pair(name, kwargs)
    swa = torch.optim.swa_utils
    runs = []
    for m, o in ((model, opt), (ref, topt)):
        runs.append(dict(m=m, o=o, cos=lr_scheduler.CosineAnnealingLR(o, T_max=6),
                         swalr=swa.SWALR(o, swa_lr=0.01, anneal_epochs=3,
                                         anneal_strategy="linear"),
                         avg=swa.AveragedModel(m),
                         ema=swa.AveragedModel(m, multi_avg_fn=swa.get_ema_multi_avg_fn(0.9))))
    x, y = _data()
    for step in range(12):
        for r in runs:
            _step(r["m"], r["o"], x, y)
            if step >= 6:
                r["avg"].update_parameters(r["m"])
                r["swalr"].step()
            else:
                r["cos"].step()
            r["ema"].update_parameters(r["m"])
        mine, theirs = runs
        _assert_weights(mine["m"], theirs["m"], f"step {step + 1}")
        assert mine["o"].param_groups[0]["lr"] == theirs["o"].param_groups[0]["lr"]
    _assert_weights(runs[0]["avg"].module, runs[1]["avg"].module, "SWA average")
    _assert_weights(runs[0]["ema"].module, runs[1]["ema"].module, "EMA")
    assert runs[0]["avg"].n_averaged.item() == 6


# -- GradScaler, clipping, optimizer in backward ------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [("Adam", {"lr": 0.01}), ("SGD", {"lr": 0.05,
                                                                           "momentum": 0.9})],
                         ids=["Adam", "SGD"])
def test_grad_scaler_on_cpu_with_bfloat16_autocast_and_clipping(name, kwargs):
    """torch.amp's recipe on the CPU: a bfloat16 autocast forward of float32 parameters, a
    scaled backward, ``unscale_`` then ``clip_grad_norm_``, ``scaler.step`` and ``update``.
    Two steps have an infinite gradient: the scaler skips them (no state changes) and halves
    its scale, for both optimizers alike."""
    model, opt, ref, topt = _pair(name, kwargs)
    x, y = _data()
    runs = [(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)),
            (ref, topt, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3))]
    counts = [0, 0]
    for i, o in enumerate((opt, topt)):
        o.register_step_post_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    for step in range(10):
        norms = []
        for m, o, scaler in runs:
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
                assert out.dtype == torch.bfloat16
                loss = (out.float() - y).pow(2).mean()
            scaler.scale(loss).backward()
            if step in (2, 6):
                m[0].weight.grad[0, 0] = float("inf")
            scaler.unscale_(o)
            norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5))
            scaler.step(o)
            scaler.update()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        torch.testing.assert_close(norms[0], norms[1], **F32)
        assert runs[0][2].get_scale() == runs[1][2].get_scale()
        _assert_weights(model, ref, f"step {step + 1}")
    assert counts == [8, 8]  # two skipped steps


def test_clip_grad_norm_and_value_clip_what_the_step_reads():
    model, opt, ref, topt = _pair("Adam", {"lr": 0.01})
    x, y = _data()
    for step in range(8):
        for m, o in ((model, opt), (ref, topt)):
            o.zero_grad()
            _loss(m, x, y).backward()
            total = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.05, foreach=True)
            assert total > 0.05  # it really clipped
            torch.nn.utils.clip_grad_value_(m[2].parameters(), clip_value=0.01)
            o.step()
        _assert_weights(model, ref, f"step {step + 1}")


@pytest.mark.parametrize("name,kwargs", [("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
                                         ("SGD", {"lr": 0.05, "momentum": 0.9}),
                                         ("RMSprop", {"lr": 0.01})],
                         ids=["AdamW", "SGD", "RMSprop"])
def test_optimizer_in_backward_one_optimizer_per_parameter(name, kwargs):
    """Each parameter steps in its ``register_post_accumulate_grad_hook``, with its own
    fastopt.torch optimizer, during the backward pass (the gradient is freed right after).
    The same with torch.optim, and a plain loop with one torch optimizer for the whole model,
    reach the same weights."""
    model = _model()
    ref, plain = copy.deepcopy(model), copy.deepcopy(model)
    handles, steps = [], []

    def install(m, cls):
        opts = {p: cls([p], **kwargs) for p in m.parameters()}

        def hook(p):
            opts[p].step()
            opts[p].zero_grad()
            steps.append(cls)

        handles.extend(p.register_post_accumulate_grad_hook(hook) for p in m.parameters())
        return opts

    opts = install(model, getattr(ft, name))
    install(ref, getattr(torch.optim, name))
    popt = getattr(torch.optim, name)(plain.parameters(), **kwargs)
    x, y = _data()
    try:
        for step in range(8):
            for m in (model, ref):
                loss = _loss(m, x, y)
                loss.backward()
                assert all(p.grad is None for p in m.parameters())
            _step(plain, popt, x, y)
            _assert_weights(model, ref, f"step {step + 1}")
            _assert_weights(model, plain, f"step {step + 1} (one optimizer)")
    finally:
        for h in handles:
            h.remove()
    assert steps.count(getattr(ft, name)) == 8 * 4
    assert all(o.state[p]["step"].item() == 8 for p, o in opts.items()
               if "step" in o.state[p])


# -- Lightning ----------------------------------------------------------------------------------


#: Lightning's advice about data loader workers, and a deprecation inside Lightning
_quiet_lightning = pytest.mark.filterwarnings("ignore:.*does not have many workers",
                                              "ignore:.*LeafSpec.* is deprecated")


def _lightning():
    return pytest.importorskip("lightning.pytorch", reason="the Lightning tests need lightning "
                                                           "(the integrations extra)")


def _loader(n=32, batch_size=8):
    x, y = _data(n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                       batch_size=batch_size, shuffle=False)


def _lightning_module(pl, cls, kwargs, manual=False):
    """A LightningModule whose ``configure_optimizers`` returns ``cls`` and a StepLR stepping
    per optimizer step; with ``manual``, the module steps them itself."""

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            loss = _loss(self.net, *batch)
            if manual:
                opt, sched = self.optimizers(), self.lr_schedulers()
                assert isinstance(opt.optimizer, cls)
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
            return loss

        def configure_optimizers(self):
            opt = cls(self.parameters(), **kwargs)
            sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    return Module()


def _lightning_recorder(pl):
    class Record(pl.Callback):
        """The weights after every training batch."""

        def __init__(self):
            self.history = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.history.append(_weights(module.net))

    return Record()


def _lightning_fit(pl, module, *, ckpt_path=None, callbacks=(), **kwargs):
    record = _lightning_recorder(pl)
    kwargs.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[record, *callbacks], **kwargs)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return trainer, record.history


@_quiet_lightning
@pytest.mark.parametrize("name,kwargs", [("AdamW", {"lr": 0.02, "weight_decay": 0.1}),
                                         ("SGD", {"lr": 0.1, "momentum": 0.9})],
                         ids=["AdamW", "SGD"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_configure_optimizers_with_a_scheduler(name, kwargs, precision):
    """Lightning's loop with gradient accumulation and clipping (and a bfloat16 autocast
    forward of the float32 weights with ``bf16-mixed``) steps the fastopt.torch optimizer and
    its scheduler as it steps torch's: the same weights after every batch."""
    pl = _lightning()
    runs = []
    for cls in (getattr(ft, name), getattr(torch.optim, name)):
        module = _lightning_module(pl, cls, kwargs)
        trainer, history = _lightning_fit(pl, module, max_epochs=2, accumulate_grad_batches=2,
                                          gradient_clip_val=0.5, precision=precision)
        assert isinstance(trainer.optimizers[0], cls)
        assert trainer.global_step == 4  # 8 batches, 2 per step
        runs.append((trainer, history))
    _assert_history(runs[0][1], runs[1][1])
    lrs = [t.lr_scheduler_configs[0].scheduler.get_last_lr() for t, _ in runs]
    assert lrs[0] == lrs[1] == [pytest.approx(kwargs["lr"] * 0.7 ** 2)]  # stepped 4 times


@_quiet_lightning
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_lightning_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    """ModelCheckpoint writes a checkpoint every epoch; a fresh Trainer resumed from the second
    epoch's checkpoint with ``ckpt_path`` (loaded with ``weights_only=True``) ends with the
    weights of the uninterrupted run, bit for bit, and the uninterrupted run's match
    torch.optim's."""
    pl = _lightning()
    kwargs = {"lr": 0.02}
    def every_epoch(where):
        return pl.callbacks.ModelCheckpoint(dirpath=where, filename="{epoch}", save_top_k=-1,
                                            every_n_epochs=1)

    _, history = _lightning_fit(pl, _lightning_module(pl, ft.Adam, kwargs), max_epochs=4,
                                enable_checkpointing=True, callbacks=[every_epoch(tmp_path)])
    _, reference = _lightning_fit(pl, _lightning_module(pl, torch.optim.Adam, kwargs),
                                  max_epochs=4)
    _assert_history(history, reference)

    ckpt = tmp_path / "epoch=1.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    (state,) = saved["optimizer_states"]
    assert all(isinstance(v, torch.Tensor) for st in state["state"].values() for v in st.values())
    assert {st["step"].item() for st in state["state"].values()} == {8.0}
    for later in ("epoch=2.ckpt", "epoch=3.ckpt"):
        (tmp_path / later).unlink()  # the resumed run writes them again
    module = _lightning_module(pl, ft.Adam, kwargs)
    trainer, resumed = _lightning_fit(pl, module, max_epochs=4, ckpt_path=ckpt,
                                      enable_checkpointing=True,
                                      callbacks=[every_epoch(tmp_path)])
    assert trainer.global_step == 16 and len(resumed) == 8
    for a, b in zip(resumed, history[8:]):
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    assert trainer.optimizers[0].state[module.net[0].weight]["step"].item() == 16.0
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"epoch={k}.ckpt" for k in range(4)]


@_quiet_lightning
def test_lightning_manual_optimization():
    pl = _lightning()
    kwargs = {"lr": 0.05, "momentum": 0.9, "nesterov": True}
    histories = []
    for cls in (ft.SGD, torch.optim.SGD):
        trainer, history = _lightning_fit(pl, _lightning_module(pl, cls, kwargs, manual=True),
                                          max_epochs=2)
        assert trainer.global_step == 8
        histories.append(history)
    _assert_history(*histories)


# -- the transformers Trainer -------------------------------------------------------------------


def _transformers():
    return pytest.importorskip("transformers", reason="the Trainer tests need transformers "
                                                      "(the integrations extra)")


def _tiny_bert(tf):
    """A randomly initialised two-layer BERT classifier of hidden size 16, from a config (no
    download); no dropout."""
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(config)


class _Tokens(torch.utils.data.Dataset):
    """24 random sequences of 8 tokens with a label each, in memory."""

    def __init__(self):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, 32, (24, 8), generator=g)
        self.labels = torch.randint(0, 3, (24,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.labels[i]}


def _train(tf, tmp_path, *, optimizers=None, cls_and_kwargs=None, resume=None, **args):
    """A Trainer run of 6 steps (one shuffled epoch of batches of 4) on the CPU, with the
    Trainer's linear schedule; returns the trainer, the model and its weights after every
    step."""
    model = _tiny_bert(tf)
    history = []

    class Record(tf.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            history.append(_weights(model))

    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=6,
                    per_device_train_batch_size=4, learning_rate=0.01, weight_decay=0.1,
                    warmup_steps=2, lr_scheduler_type="linear", max_grad_norm=1.0, seed=0,
                    logging_strategy="no", save_strategy="no", disable_tqdm=True,
                    dataloader_num_workers=0)
    settings.update(args)
    extra = {}
    if optimizers is not None:
        extra["optimizers"] = (optimizers(model), None)
    if cls_and_kwargs is not None:
        extra["optimizer_cls_and_kwargs"] = cls_and_kwargs
    trainer = tf.Trainer(model=model, args=tf.TrainingArguments(**settings),
                         train_dataset=_Tokens(), callbacks=[Record()], **extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, history


def _adamw(cls):
    return lambda model: cls(model.parameters(), lr=0.01, weight_decay=0.1)


def _unwrapped(opt):
    while hasattr(opt, "optimizer"):  # accelerate's AcceleratedOptimizer
        opt = opt.optimizer
    return opt


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_transformers_trainer_with_a_fastopt_torch_optimizer(tmp_path, how):
    """The Trainer's loop (its schedule, clipping, accelerate's wrapper) with a fastopt.torch
    AdamW, passed built (``optimizers``) or as a class the Trainer builds with its two
    weight-decay groups (``optimizer_cls_and_kwargs``): the weights of torch's AdamW after
    every step."""
    tf = _transformers()
    runs = []
    for cls in (ft.AdamW, torch.optim.AdamW):
        if how == "optimizers":
            run = _train(tf, tmp_path / cls.__module__, optimizers=_adamw(cls))
        else:
            run = _train(tf, tmp_path / cls.__module__,
                         cls_and_kwargs=(cls, {"lr": 0.01, "betas": (0.9, 0.99)}))
        trainer = run[0]
        assert type(_unwrapped(trainer.optimizer)) is cls
        assert trainer.state.global_step == 6
        runs.append(run)
    (trainer, model, history), (ttrainer, _, thistory) = runs
    assert len(history) == 6
    _assert_history(history, thistory)
    groups = _unwrapped(trainer.optimizer).param_groups
    assert len(groups) == (1 if how == "optimizers" else 2)
    tgroups = _unwrapped(ttrainer.optimizer).param_groups
    assert [g["lr"] for g in groups] == [g["lr"] for g in tgroups]
    assert [g["weight_decay"] for g in groups] == [g["weight_decay"] for g in tgroups]
    weight = model.bert.embeddings.word_embeddings.weight
    assert _unwrapped(trainer.optimizer).state[weight]["step"].item() == 6


def test_transformers_trainer_resumes_from_a_checkpoint(tmp_path):
    """An uninterrupted run that saves every 3 steps, and a fresh Trainer (fresh model and
    fresh fastopt.torch optimizer) resumed from the step-3 checkpoint: the Trainer loads
    ``optimizer.pt`` with ``weights_only=True`` into the fastopt.torch optimizer, and the
    resumed run ends with the weights of the uninterrupted one, bit for bit."""
    tf = _transformers()
    out = tmp_path / "run"
    _, model, history = _train(tf, out, optimizers=_adamw(ft.AdamW), save_strategy="steps",
                               save_steps=3)
    _, _, reference = _train(tf, tmp_path / "torch", optimizers=_adamw(torch.optim.AdamW))
    _assert_history(history, reference)
    ckpt = out / "checkpoint-3"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {st["step"].item() for st in saved["state"].values()} == {3.0}
    trainer, resumed_model, resumed = _train(tf, out, optimizers=_adamw(ft.AdamW),
                                             resume=str(ckpt))
    assert trainer.state.global_step == 6 and len(resumed) == 3
    for a, b in zip(resumed, history[3:]):
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


# -- accelerate ---------------------------------------------------------------------------------


@pytest.fixture
def accelerate():
    """accelerate, its process-wide state reset before and after the test (an Accelerator
    made by another test, the transformers Trainer's, would otherwise be reused)."""
    acc = pytest.importorskip("accelerate", reason="the accelerate tests need accelerate "
                                                   "(the integrations extra)")
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield acc
    reset()


def _accelerated(acc, cls, kwargs, seed=0):
    """A model, optimizer, 8 micro-batches and a StepLR, prepared by an Accelerator on the CPU
    that accumulates 2 micro-batches per step; counts the optimizer's real steps."""
    accelerator = acc.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model(seed)
    opt = cls(model.parameters(), **kwargs)
    steps = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    parts = accelerator.prepare(model, opt, _loader(32, batch_size=4), sched)
    return accelerator, parts, opt, steps


def _accelerate_loop(accelerator, model, opt, loader, sched, history):
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = _loss(model, x, y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        history.append(_weights(model))


@pytest.mark.parametrize("name,kwargs", [("AdamW", {"lr": 0.05, "weight_decay": 0.1}),
                                         ("SGD", {"lr": 0.05, "momentum": 0.9})],
                         ids=["AdamW", "SGD"])
def test_accelerate_prepare_and_gradient_accumulation(accelerate, name, kwargs):
    """``prepare`` wraps the fastopt.torch optimizer (AcceleratedOptimizer) and its scheduler;
    under ``accumulate`` with 2 micro-batches per step, 8 micro-batches step the optimizer
    exactly 4 times, and the weights after every micro-batch are torch.optim's."""
    runs = []
    for cls in (getattr(ft, name), getattr(torch.optim, name)):
        accelerator, parts, opt, steps = _accelerated(accelerate, cls, kwargs)
        model, popt, loader, sched = parts
        assert isinstance(popt, accelerate.optimizer.AcceleratedOptimizer)
        assert popt.optimizer is opt
        assert isinstance(sched, accelerate.scheduler.AcceleratedScheduler)
        history = []
        _accelerate_loop(accelerator, model, popt, loader, sched, history)
        assert len(history) == 8 and len(steps) == 4
        if "step" in opt.state[model[0].weight]:
            assert opt.state[model[0].weight]["step"].item() == 4
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.8 ** 4)
        runs.append(history)
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
        accelerate.state.GradientState._reset_state()
    # micro-batches that only accumulate leave the weights as they were
    for i in (0, 2, 4, 6):
        assert all(torch.equal(p, q) for p, q in zip(runs[0][i], _weights(_model()) if i == 0
                                                     else runs[0][i - 1]))
    _assert_history(*runs)


def test_accelerate_save_state_and_load_state_resume_bit_for_bit(accelerate, tmp_path):
    """``save_state`` after 2 of 4 steps writes the fastopt.torch optimizer's state
    (optimizer.bin, loadable with ``weights_only=True``); a fresh Accelerator, model and
    optimizer ``load_state`` it and finish the run with the uninterrupted run's weights, bit
    for bit."""
    kwargs = {"lr": 0.05}
    accelerator, (model, opt, loader, sched), _, _ = _accelerated(accelerate, ft.Adam, kwargs)
    history = []
    for k, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, x, y))
            opt.step()
            sched.step()
            opt.zero_grad()
        history.append(_weights(model))
        if k == 3:
            accelerator.save_state(str(tmp_path / "state"))
    saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)
    assert {st["step"].item() for st in saved["state"].values()} == {2.0}

    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()
    accelerator, (model, opt, loader, sched), inner, steps = _accelerated(
        accelerate, ft.Adam, kwargs, seed=7)
    accelerator.load_state(str(tmp_path / "state"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), history[3]))
    assert inner.state[model[0].weight]["step"].item() == 2.0
    resumed = []
    _accelerate_loop(accelerator, model, opt, accelerator.skip_first_batches(loader, 4), sched,
                     resumed)
    assert len(steps) == 2 and len(resumed) == 4
    for a, b in zip(resumed, history[4:]):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


# -- torch.distributed.checkpoint ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # no process group: DCP runs in one process
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("saved_by", ["fastopt.torch", "torch.optim"])
def test_distributed_checkpoint_save_and_load_resume(tmp_path, saved_by, flatten):
    """``get_state_dict`` / ``dcp.save`` / ``dcp.load`` / ``set_state_dict``, the checkpoint
    path of FSDP2 and of the trainers built on it: the optimizer state dict is keyed by
    parameter names, which fastopt.torch loads as torch does. A run checkpointed after 3 steps
    (by fastopt.torch or by torch.optim) and resumed by a fresh fastopt.torch model and
    optimizer ends as the uninterrupted run does."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd
    options = dsd.StateDictOptions(flatten_optimizer_state_dict=flatten)
    first = ft.AdamW if saved_by == "fastopt.torch" else torch.optim.AdamW
    kwargs = {"lr": 0.05, "weight_decay": 0.1}
    model, ref = _model(), _model()
    opt, topt = first(model.parameters(), **kwargs), torch.optim.AdamW(ref.parameters(),
                                                                        **kwargs)
    x, y = _data()
    for _ in range(3):
        _step(model, opt, x, y)
        _step(ref, topt, x, y)
    msd, osd = dsd.get_state_dict(model, opt, options=options)
    assert any(isinstance(k, str) and "weight" in k for k in (
        osd["state"] if "state" in osd else osd))  # names, not ints
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))

    resumed = _model(seed=7)
    ropt = ft.AdamW(resumed.parameters(), **kwargs)
    msd, osd = dsd.get_state_dict(resumed, ropt, options=options)  # empty state made here
    loaded = {"model": msd, "optim": osd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    dsd.set_state_dict(resumed, ropt, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optim"], options=options)
    assert ropt.state[resumed[0].weight]["step"].item() == 3.0
    for step in range(3):
        _step(model, opt, x, y)
        _step(resumed, ropt, x, y)
        _step(ref, topt, x, y)
        _assert_weights(resumed, ref, f"step {step + 4}")
        if first is ft.AdamW:
            assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(),
                                                         model.parameters()))


def test_state_dict_keyed_by_parameter_names():
    """What ``set_optimizer_state_dict`` hands to ``load_state_dict``: the ids are parameter
    names, matched by position as torch matches them; a state entry under a name that no
    group lists is refused naming it, with nothing changed."""
    model, opt, ref, topt = _pair("Adam", {"lr": 0.05})
    x, y = _data()
    _step(model, opt, x, y)
    _step(ref, topt, x, y)
    names = [n for n, _ in ref.named_parameters()]
    sd = topt.state_dict()
    named = dict(sd, state={names[i]: st for i, st in sd["state"].items()},
                 param_groups=[dict(g, params=[names[i] for i in g["params"]])
                               for g in sd["param_groups"]])
    twin = copy.deepcopy(ref)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    # (a copy each: as torch's, the loaded state shares the tensors of the dict it came from)
    twin_opt.load_state_dict(copy.deepcopy(named))  # torch loads it
    opt.load_state_dict(copy.deepcopy(named))
    for step in range(3):
        _step(model, opt, x, y)
        _step(twin, twin_opt, x, y)
        _assert_weights(model, twin, f"step {step + 2}")
    before = {k: v.clone() for k, v in opt.state[model[2].bias].items()}
    bad = dict(named, state=dict(named["state"], **{"3.bias": named["state"]["2.bias"]}))
    with pytest.raises(KeyError, match=r"state\['3\.bias'\]: no parameter .* named '3\.bias'"):
        opt.load_state_dict(bad)
    assert all(torch.equal(opt.state[model[2].bias][k], v) for k, v in before.items())
    mixed = dict(named, param_groups=[dict(named["param_groups"][0],
                                           params=[0] + names[1:])])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] must be an int"):
        opt.load_state_dict(mixed)
