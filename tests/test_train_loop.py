from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from miro.models.patch_resize import PATCH_KEYS
from miro.train import cli
from miro.train import preflight as pf
from tests._train_helpers import tiny_overrides, train_until_then_sigkill, write_tiny_shards


def _run(overrides):
    cfg = OmegaConf.to_container(cli.compose(overrides), resolve=True)
    module, dm, trainer, ckpt = cli.build(cfg)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module, dm, trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


def test_a_few_steps_reduce_the_loss(data_dir, tmp_path):
    ov = tiny_overrides(data_dir, tmp_path, steps=20, every=1000,
                        extra=["optimizer.lr=3e-3", "loss.self_cond_rate=0.0", "ema_decays=[0.5]"])
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    module, dm, trainer, _ = cli.build(cfg)
    dm.prepare()
    batch = next(iter(dm.train_dataloader()))

    def fixed_loss():
        module.model.train()
        with torch.no_grad():
            losses = [module.compute_loss(batch, torch.Generator().manual_seed(s))[0] for s in range(8)]
        return float(torch.stack(losses).mean())

    before = fixed_loss()
    trainer.fit(module, datamodule=dm)
    after = fixed_loss()
    assert trainer.global_step == 20
    assert after < 0.8 * before, (before, after)


def test_resume_equals_uninterrupted(data_dir, tmp_path):
    sched = ["scheduler.total_steps=6"]  # the schedule is fixed by the config, not by when a run stops
    full, _, _ = _run(tiny_overrides(data_dir, tmp_path / "a", steps=6, every=3, extra=sched))
    # a stop between periodic saves (step 3, every 2) still writes its own step to last.ckpt
    part, _, t = _run(tiny_overrides(data_dir, tmp_path / "b", steps=3, every=2, extra=sched))
    assert t.global_step == 3
    ckdir = tmp_path / "b" / "miro" / "checkpoints" / "shapes_miro"
    ck = torch.load(ckdir / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 3 and ck["MiroDataModule"]["position"] == 3 * 8
    assert sorted(p.name for p in ckdir.glob("step=*.ckpt")) == ["step=2.ckpt", "step=3.ckpt"]
    res, dm, t2 = _run(tiny_overrides(data_dir, tmp_path / "b", steps=6, every=3, extra=sched))  # resume=auto
    assert t2.global_step == 6 and res.micro_step == 6 and dm.position == 6 * 8
    for (n, a), (_, b) in zip(full.state_dict().items(), res.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    # optimizer state is restored too: the lr schedule continued from step 3
    assert t2.lr_scheduler_configs[0].scheduler.last_epoch == 6


@pytest.mark.slow
def test_sigkill_then_resume(data_dir, tmp_path):
    root = tmp_path / "k"
    ckdir = root / "miro" / "checkpoints" / "shapes_miro"
    sched = ["scheduler.total_steps=200"]
    train_until_then_sigkill(tiny_overrides(data_dir, root, steps=100, every=2, extra=sched), ckdir / "step=4.ckpt")
    ck = torch.load(ckdir / "last.ckpt", weights_only=True)  # never half-written
    k = int(ck["global_step"])
    assert k >= 2 and k % 2 == 0 and ck["MiroDataModule"]["position"] == 8 * k  # last.ckpt may lag step=4
    res, dm, t = _run(tiny_overrides(data_dir, root, steps=k + 2, every=2, extra=sched))
    assert t.global_step == k + 2 and dm.position == 8 * (k + 2)
    full, _, _ = _run(tiny_overrides(data_dir, tmp_path / "full", steps=k + 2, every=1000, extra=sched))
    for (n, a), (_, b) in zip(full.state_dict().items(), res.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


ONE_RANK = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)


def test_nonfinite_guard_counts_another_ranks_bad_loss():
    # under DDP every rank must stop at the same step, or the others hang in their next all-reduce
    from miro.train.callbacks import NonFiniteGuard

    asked = []

    def other_rank_bad(decision, all=True):
        asked.append((decision, all))
        return False  # the AND over ranks: another rank's loss was not finite

    mod = SimpleNamespace(log=lambda *a, **k: None, print=lambda *a: None)
    trainer = SimpleNamespace(should_stop=False, global_step=5, strategy=SimpleNamespace(reduce_boolean_decision=other_rank_bad))
    g = NonFiniteGuard(max_consecutive=2)
    g.on_train_batch_end(trainer, mod, {"loss": torch.tensor(1.0)}, None, 0)
    assert g.consecutive == 1 and asked == [(True, True)]
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite losses"):
        g.on_train_batch_end(trainer, mod, {"loss": torch.tensor(1.0)}, None, 0)


def test_a_retargeted_schedule_applies_from_the_first_resumed_step():
    from miro.train.optim import WarmupCosineDecayLR

    def make(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, WarmupCosineDecayLR(opt, warmup_steps=2, total_steps=total)

    opt, sched = make(10)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = make(40)
    opt2.load_state_dict(opt.state_dict())  # as Lightning restores it: the old schedule's lr
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(sched2.factor(4)) and sched2.factor(4) != sched.factor(4)
    assert sched2.get_last_lr() == [opt2.param_groups[0]["lr"]]


def test_nonfinite_guard_zeroes_grads_and_stops():
    from miro.train.callbacks import NonFiniteGuard

    lin = torch.nn.Linear(2, 2)
    lin.weight.grad = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    mod = SimpleNamespace(parameters=lin.parameters, log=lambda *a, **k: None, print=lambda *a: None)
    trainer = SimpleNamespace(should_stop=False, global_step=7, strategy=ONE_RANK)
    g = NonFiniteGuard(max_consecutive=2)
    g.on_before_optimizer_step(trainer, mod, None)
    assert torch.equal(lin.weight.grad, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    g.on_train_batch_end(trainer, mod, {"loss": torch.tensor(float("nan"))}, None, 0)
    g.on_train_batch_end(trainer, mod, {"loss": torch.tensor(1.0)}, None, 0)  # resets the count
    g.on_train_batch_end(trainer, mod, {"loss": torch.tensor(float("nan"))}, None, 0)
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite losses"):
        g.on_train_batch_end(trainer, mod, {"loss": torch.tensor(float("inf"))}, None, 0)
    assert trainer.should_stop


def test_nonfinite_guard_catches_inf_alone_and_its_count_survives_a_resume():
    """An Inf-only gradient is zeroed like a NaN one, finite gradients are left alone, and the
    run of non-finite losses is saved and restored with the callback state."""
    from miro.train.callbacks import NonFiniteGuard

    lin = torch.nn.Linear(2, 2)
    lin.weight.grad = torch.tensor([[1.0, float("inf")], [3.0, 2.0]])
    lin.bias.grad = torch.tensor([0.5, -0.5])
    mod = SimpleNamespace(parameters=lin.parameters, log=lambda *a, **k: None, print=lambda *a: None)
    trainer = SimpleNamespace(should_stop=False, global_step=3, strategy=ONE_RANK)
    g = NonFiniteGuard(max_consecutive=2)
    g.on_before_optimizer_step(trainer, mod, None)
    assert torch.equal(lin.weight.grad, torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
    assert torch.equal(lin.bias.grad, torch.tensor([0.5, -0.5])) and g.total_bad_grads == 1
    g.on_before_optimizer_step(trainer, mod, None)  # all finite now: not counted
    assert g.total_bad_grads == 1
    g.on_train_batch_end(trainer, mod, {"loss": torch.tensor(float("nan"))}, None, 0)
    resumed = NonFiniteGuard(max_consecutive=2)
    resumed.load_state_dict(g.state_dict())
    assert (resumed.consecutive, resumed.total_bad_grads) == (1, 1)
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite losses"):
        resumed.on_train_batch_end(trainer, mod, {"loss": torch.tensor(float("nan"))}, None, 0)


@pytest.mark.parametrize("uninformative", [False, True])
def test_baseline_ignores_sample_rewards(data_dir, tmp_path, uninformative):
    ov = tiny_overrides(data_dir, tmp_path, extra=[f"rewards.uninformative={str(uninformative).lower()}"])
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    module, dm, _, _ = cli.build(cfg)
    assert module.hparams["uninformative_rewards"] is uninformative
    assert (dm.cfg.reward_keys == []) is uninformative  # the baseline needs no reward scores in the data
    dm.prepare()
    batch = next(iter(dm.train_dataloader()))
    keys = module.model.coherence_keys
    b2 = dict(batch, rewards={k: torch.full((8,), 0.0 if uninformative else 1.0) for k in keys})
    b1 = dict(batch, rewards={k: torch.full((8,), 1.0 if uninformative else 0.0) for k in keys})
    with torch.no_grad():
        l1 = module.compute_loss(b1, torch.Generator().manual_seed(0))[0]
        l2 = module.compute_loss(b2, torch.Generator().manual_seed(0))[0]
    assert torch.equal(l1, l2) is uninformative


def test_on_the_fly_text_cache_matches_fresh_encoding():
    from miro.models import get_config
    from miro.train.module import MiroLightningModule

    class Stub:
        calls = 0

        def encode(self, prompts):
            Stub.calls += 1
            n = [len(p.split()) for p in prompts]
            emb = torch.zeros(len(prompts), 6, 384)
            mask = torch.zeros(len(prompts), 6, dtype=torch.bool)
            for i, (p, k) in enumerate(zip(prompts, n)):
                emb[i, :k] = (hash(p) % 1000) / 7.0 + torch.arange(k)[:, None] / 3.0
                mask[i, :k] = True
            return emb, mask

    m = MiroLightningModule({"model_config": get_config("tiny"), "text_cache_size": 2})
    object.__setattr__(m, "_text_encoder", Stub())
    e1, m1 = m.encode_captions(["a b", "c d e"])
    e2, m2 = m.encode_captions(["c d e", "c d e"])  # cached: no new encoder call
    assert Stub.calls == 1
    torch.testing.assert_close(e2[0, :3], e1[1, :3], rtol=0, atol=0)
    assert m2.sum(1).tolist() == [3, 3] and m1.sum(1).tolist() == [2, 3]
    fresh = MiroLightningModule({"model_config": get_config("tiny")})
    object.__setattr__(fresh, "_text_encoder", Stub())
    e3, _ = fresh.encode_captions(["c d e"])
    torch.testing.assert_close(e3[0], e2[0, :3], rtol=0, atol=0)  # identical whether cached or not
    assert e1.dtype == torch.float32 and torch.equal(e1[1], e1[1].half().float())  # fp16-rounded like shards
    m.encode_captions(["x", "y"])
    assert len(m._text_cache) == 2 and "a b" not in m._text_cache  # LRU bound


def test_position_init_reaches_the_model_and_every_ema_copy():
    from miro.models import get_config
    from miro.models.rin import sincos_2d_table
    from miro.train.module import MiroLightningModule

    cfg = get_config("tiny")
    grid = cfg["network"]["data_size"] // cfg["network"]["patch_size"]
    table = sincos_2d_table(grid, cfg["network"]["data_dim"])
    m = MiroLightningModule({"model_config": cfg, "position_init": "sincos", "ema_decays": [0.9, 0.99]})
    assert torch.equal(m.model.network.data_pos_embedding.data, table)
    for i in range(2):
        assert torch.equal(m.ema_model(i).network.data_pos_embedding, table)
    published = MiroLightningModule({"model_config": cfg})
    assert published.ema.decays == [0.9999]  # no ema_decays: the release's one 0.9999 copy
    assert published.model.network.data_pos_embedding.abs().max() <= 0.04
    # only the table differs from the published init of the same seed
    a, b = m.model.state_dict(), published.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["network.data_pos_embedding"]
    with pytest.raises(ValueError, match="'published' or 'sincos'"):
        MiroLightningModule({"model_config": cfg, "position_init": "learned"})


def test_resume_refuses_a_different_model_config(data_dir, tmp_path):
    _run(tiny_overrides(data_dir, tmp_path, steps=2, every=2, extra=["scheduler.total_steps=4"]))
    other = tiny_overrides(data_dir, tmp_path, steps=4, every=2,
                           extra=["scheduler.total_steps=4", "++model.overrides={network: {num_blocks: 2, num_text_registers: 2}}"])
    with pytest.raises(ValueError, match="network.num_blocks: checkpoint 1 vs now 2"):  # in the pre-flight:
        cli.build(OmegaConf.to_container(cli.compose(other), resolve=True))  # before any data or model work


def test_training_runs_through_corrupt_data(tmp_path):
    from miro.data import schema

    d = write_tiny_shards(tmp_path / "bad", n_shards=2, per=16)
    raw = list(schema.iter_raw_samples(d / "shard-00000.tar"))
    raw[5]["png"] = b"\x89PNG broken"
    schema.write_shard(d / "shard-00000.tar", [dict(r) for r in raw])
    last = d / "shard-00001.tar"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.warns(UserWarning) as caught:
        module, dm, trainer = _run(tiny_overrides(d, tmp_path / "run", steps=4, every=1000,
                                                  extra=["scheduler.total_steps=10"]))
    msgs = [str(w.message) for w in caught]
    assert any("shard-00001.tar" in m and "is truncated or unreadable" in m for m in msgs), msgs
    assert any(f"skipping corrupt sample #5 (key {raw[5]['__key__']} in " in m and "shard-00000.tar" in m for m in msgs), msgs
    assert trainer.global_step == 4
    assert dm.stats.truncated_shards == 1 and 16 < len(dm.data) < 32
    assert module.corrupt_seen >= 1  # the broken image was met, replaced and counted


def test_atomic_checkpoint_io(tmp_path, monkeypatch):
    from miro.train.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))

    def boom(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"a": torch.zeros(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


def test_init_from_checkpoint_and_ema_warmup_steps(data_dir, tmp_path):
    src, _, _ = _run(tiny_overrides(data_dir, tmp_path / "a", steps=3, every=3))
    ckpt = tmp_path / "a" / "miro" / "checkpoints" / "shapes_miro" / "last.ckpt"
    # lr=0: the warm-started weights must survive training untouched, in the model and the EMA
    ov = tiny_overrides(data_dir, tmp_path / "b", steps=3, every=100,
                        extra=[f"init_from={ckpt}", "init_weights=raw", "ema_warmup=true", "optimizer.lr=0.0"])
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    module, dm, trainer, resume = cli.build(cfg)
    assert resume is None and "raw weights" in module.init_source
    steps = []
    update = module.ema.update
    module.ema.update = lambda model, step=None: (steps.append(step), update(model, step))
    trainer.fit(module, datamodule=dm)
    assert steps == [0, 1, 2] and module.ema.warmup
    for (n, a), b in zip(src.model.state_dict().items(), module.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    for n, b in module.ema_model().state_dict().items():
        torch.testing.assert_close(src.model.state_dict()[n], b, msg=n)


def test_init_from_rejects_other_architectures(data_dir, tmp_path):
    ov = tiny_overrides(data_dir, tmp_path, steps=1, every=100, extra=["init_from=shapes", "scheduler.warmup_steps=0"])
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    with pytest.raises(ValueError, match="init_from='shapes' does not fit"):
        cli.build(cfg)
    cfg["init_from"], cfg["init_weights"] = "shapes", "best"
    with pytest.raises(ValueError, match="init_weights=best is not one of ema, raw"):  # the pre-flight's
        cli.build(cfg)
    with pytest.raises(ValueError, match="init_weights must be 'ema' or 'raw'; got 'best'"):  # the module's own
        cli.build(dict(cfg, init_from=None, init_weights="ema"))[0].load_initial_weights("shapes", "best")


def test_init_from_a_coarser_patch_resizes_the_patch_tensors(data_dir, tmp_path):
    coarse = ["++model.overrides={network: {num_blocks: 1, num_text_registers: 2, patch_size: 4}}"]
    src, _, _ = _run(tiny_overrides(data_dir, tmp_path / "a", steps=3, every=3, extra=coarse))
    ckpt = tmp_path / "a" / "miro" / "checkpoints" / "shapes_miro" / "last.ckpt"
    ov = tiny_overrides(data_dir, tmp_path / "b", steps=3, every=100, extra=[f"init_from={ckpt}", "init_weights=raw"])
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    module, _, _, _ = cli.build(cfg)
    assert module.model.network.patch_size == 2 and "patch 4 -> 2 resized" in module.init_source
    for n, a in src.model.state_dict().items():
        b = module.model.state_dict()[n]
        if n in PATCH_KEYS:
            assert a.shape != b.shape or n.endswith("bias"), n
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_init_strict_false_keeps_a_new_module_at_its_initialisation(data_dir, tmp_path):
    net = "++model.overrides={network: {num_blocks: 1, num_text_registers: 2, data_mixer: %s}}"
    src, _, _ = _run(tiny_overrides(data_dir, tmp_path / "a", steps=3, every=3, extra=[net % "conv"]))
    ckpt = tmp_path / "a" / "miro" / "checkpoints" / "shapes_miro" / "last.ckpt"
    ov = tiny_overrides(data_dir, tmp_path / "b", steps=3, every=100,
                        extra=[net % "conv_attn", f"init_from={ckpt}", "init_weights=raw"])
    cfg = OmegaConf.to_container(cli.compose(ov), resolve=True)
    with pytest.raises(ValueError, match="missing tensor 'network.rin_blocks.0.data_mixer.attn"):
        cli.build(cfg)
    cfg["init_strict"] = False
    module, _, _, _ = cli.build(cfg)
    fresh = [k for k in module.model.state_dict() if k not in src.model.state_dict()]
    assert fresh and f"{len(fresh)} new tensors kept at their initialisation" in module.init_source
    for n, a in src.model.state_dict().items():
        torch.testing.assert_close(a, module.model.state_dict()[n], rtol=0, atol=0, msg=n)
    assert float(module.model.network.rin_blocks[0].data_mixer.attn.layer_scale_1.abs().sum()) == 0.0


def test_max_time_stops_early_and_writes_last_ckpt(data_dir, tmp_path):
    # 0.0001 minutes: Lightning's Timer stops the run after its first step; last.ckpt holds that step.
    _, _, trainer = _run(tiny_overrides(data_dir, tmp_path, steps=1000, every=1000, extra=["trainer.max_time=0.0001"]))
    assert 1 <= trainer.global_step < 1000
    ckpt = torch.load(tmp_path / "miro" / "checkpoints" / "shapes_miro" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == trainer.global_step
    # the clock is saved and counts across resumes: a resume with the budget spent would stop at
    # once and train nothing, so it is refused, naming how to go on; a larger budget resumes
    for budget in ("0.0001", "00:00:00:00"):
        with pytest.raises(ValueError, match=rf"last.ckpt has trained for 0.0 minutes, which trainer.max_time={budget} "
                                             r"allows in all .*: raise trainer.max_time, or set it to null, to continue"):
            pf.preflight(OmegaConf.to_container(cli.compose(tiny_overrides(
                data_dir, tmp_path, steps=1000, every=1000, extra=[f"trainer.max_time={budget}"])), resolve=True))
    pf.preflight(OmegaConf.to_container(cli.compose(tiny_overrides(
        data_dir, tmp_path, steps=1000, every=1000, extra=["trainer.max_time=30"])), resolve=True))


@pytest.mark.parametrize("value", [0, -5, "5m", "00:30:00"])
def test_max_time_rejects_bad_values(value):
    with pytest.raises(ValueError, match="max_time"):
        pf._max_time(value)
    assert pf._max_time(None) is None and pf._max_time("00:00:30:00") == "00:00:30:00"
    assert pf._max_time(1.5).total_seconds() == 90
