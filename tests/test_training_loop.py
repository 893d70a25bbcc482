"""The optimisation loop stages 1 and 3 share (training.loop.run_epochs)."""

from __future__ import annotations

import math

import factories
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sellarec.model.backbone import load_backbone
from sellarec.model.collab import CollabProjector, SemanticProjector
from sellarec.model.prompts import TemplateSpec
from sellarec.model.sella import SellaRec
from sellarec.training import loop, stage1, stage3
from sellarec.training.config import Stage1Config, Stage3Config
from sellarec.training.loop import run_epochs

X = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [-1.0, 1.0, 1.0], [2.0, 2.0, -1.0], [0.0, 0.3, 0.1]])
Y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
BATCHES = [[3, 1], [0, 4, 2]]


def _linear() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def _bce(model: torch.nn.Linear):
    def batch_loss(local: list[int], batch_size: int) -> torch.Tensor:
        logits = model(X[local])[:, 0]
        return F.binary_cross_entropy_with_logits(logits, Y[local], reduction="sum") / batch_size

    return batch_loss


def test_one_step_per_batch_with_the_loss_of_each_step_recorded():
    model, optimizer = _linear()
    params = list(model.parameters())
    run = run_epochs("test", 2, lambda: BATCHES, _bce(model), optimizer, params, progress=False)

    reference, ref_optimizer = _linear()
    expected = []
    for _ in range(2):
        for batch in BATCHES:
            ref_optimizer.zero_grad()
            logits = reference(X[batch])[:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, Y[batch], reduction="sum") / len(batch)
            loss.backward()
            ref_optimizer.step()
            expected.append(loss.item())
    assert run.losses == expected
    assert torch.equal(model.weight, reference.weight) and torch.equal(model.bias, reference.bias)


def test_on_step_sees_the_weights_each_step_left():
    model, optimizer = _linear()
    params = list(model.parameters())
    seen: dict[int, torch.Tensor] = {}
    run_epochs(
        "test",
        2,
        lambda: BATCHES,
        _bce(model),
        optimizer,
        params,
        progress=False,
        on_step=lambda n: seen.setdefault(n, model.weight.detach().clone()),
    )
    assert sorted(seen) == [1, 2, 3, 4]  # 1-based, after every step of both epochs
    reference, ref_optimizer = _linear()
    for n, batch in enumerate(BATCHES * 2, start=1):
        ref_optimizer.zero_grad()
        _bce(reference)(batch, len(batch)).backward()
        ref_optimizer.step()
        assert torch.equal(seen[n], reference.weight)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_gradient_norms_are_recorded_and_clipped_to_the_bound(max_norm):
    model, optimizer = _linear()
    params = list(model.parameters())
    run = run_epochs(
        "test", 2, lambda: BATCHES, _bce(model), optimizer, params, progress=False, max_grad_norm=max_norm
    )

    reference, ref_optimizer = _linear()
    norms = []
    for _ in range(2):
        for batch in BATCHES:
            ref_optimizer.zero_grad()
            _bce(reference)(batch, len(batch)).backward()
            grads = [p.grad for p in reference.parameters()]
            norm = torch.cat([g.flatten() for g in grads]).norm().item()
            norms.append(norm)
            if max_norm is not None and norm > max_norm:  # the step takes the rescaled gradient
                for g in grads:
                    g.mul_(max_norm / norm)
            ref_optimizer.step()
    assert run.grad_norms == pytest.approx(norms, rel=1e-5)
    assert torch.allclose(model.weight, reference.weight, atol=1e-6)
    if max_norm is not None:  # the bound was active, so clipping changed the trajectory
        assert max(norms) > max_norm
        unclipped, opt = _linear()
        run_epochs(
            "test", 2, lambda: BATCHES, _bce(unclipped), opt, list(unclipped.parameters()), progress=False
        )
        assert not torch.allclose(unclipped.weight, model.weight, atol=1e-4)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_bound_that_is_not_positive_is_refused(bad):
    model, optimizer = _linear()
    with pytest.raises(ValueError, match="max_grad_norm"):
        run_epochs("test", 1, lambda: BATCHES, _bce(model), optimizer, [], progress=False, max_grad_norm=bad)


def test_the_scheduler_steps_once_per_optimiser_step():
    model, optimizer = _linear()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run_epochs(
        "test",
        3,
        lambda: BATCHES,
        lambda local, n: model(X[local]).sum() / n,
        optimizer,
        list(model.parameters()),
        scheduler,
        progress=False,
    )
    assert scheduler.last_epoch == 3 * len(BATCHES)


def test_the_batches_are_drawn_once_per_epoch():
    model, optimizer = _linear()
    drawn = []

    def batches() -> list[list[int]]:
        drawn.append(1)
        return BATCHES

    run = run_epochs(
        "test", 3, batches, lambda local, n: model(X[local]).sum() / n, optimizer, [], progress=False
    )
    assert len(drawn) == 3 and len(run.losses) == 3 * len(BATCHES)


def test_a_broken_loss_function_stops_the_loop():
    model, optimizer = _linear()
    before = model.weight.detach().clone()

    def broken(local: list[int], batch_size: int) -> torch.Tensor:
        raise FloatingPointError("loss went wrong")

    with pytest.raises(FloatingPointError, match="loss went wrong"):
        run_epochs("test", 1, lambda: BATCHES, broken, optimizer, list(model.parameters()), progress=False)
    assert torch.equal(model.weight, before)


def test_the_record_holds_the_curve_and_the_base_rate():
    run = loop.TrainingRun(losses=[0.9, 0.7, 0.5], seconds=2.0)
    metrics = run.metrics(rows=6, labels=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert metrics["rows"] == 6 and metrics["seconds"] == 2.0
    assert metrics["loss_first"] == 0.9 and metrics["loss_last20"] == pytest.approx(0.7)
    assert metrics["losses"] == [0.9, 0.7, 0.5] and metrics["grad_norms"] == []
    assert metrics["base_rate_bce"] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    empty = loop.TrainingRun(losses=[], seconds=0.0).metrics(rows=0, labels=torch.tensor([]))
    assert empty["loss_first"] is None and empty["loss_last20"] is None


# --- both stages train through it --------------------------------------------------


class Spy:
    """Stands in for `run_epochs` in a stage module: runs the real loop, sees every batch
    loss the stage computes, and can make that loss fail."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.names: list[str] = []
        self.seen: list[float] = []

    def __call__(self, name, epochs, batches, batch_loss, *args, **kwargs):
        self.names.append(name)

        def checked(local: list[int], batch_size: int) -> torch.Tensor:
            loss = batch_loss(local, batch_size)
            self.seen.append(loss.item())
            if self.broken:
                raise FloatingPointError(f"{name}: broken loss")
            return loss

        return run_epochs(name, epochs, batches, checked, *args, **kwargs)


def _frame() -> pd.DataFrame:
    t = factories.TITLES
    return pd.DataFrame(
        {
            "uid": [1, 1, 2, 3, 4],
            "iid": [2, 3, 4, 5, 6],
            "label": [1, 0, 1, 0, 1],
            "his_title": [[t[0], t[1]], [t[0], t[1]], [], [t[6], t[7]], [t[8]]],
            "title": [t[2], t[3], t[4], t[5], t[6]],
        }
    )


def _train_stage1(tiny_backbone_dir, tmp_path) -> dict:
    cfg = Stage1Config(batch_size=2, lora_top_layers=1)
    return stage1.train_stage1(
        str(tiny_backbone_dir), TemplateSpec(stage="stage1"), _frame(), cfg, 0, tmp_path, progress=False
    )


def _tiny_sella(tiny_backbone_dir) -> tuple[SellaRec, stage3.SoftInputTables]:
    """Seeded: the tiny backbone with both projections, and random tables of 5 users, 10 items."""
    torch.manual_seed(0)
    model, tok, info = load_backbone(str(tiny_backbone_dir))
    proj_c, proj_w = CollabProjector(8, info.hidden_size), SemanticProjector(info.hidden_size)
    scorer = SellaRec(model, tok, TemplateSpec(), proj_c=proj_c, proj_w=proj_w)
    tables = stage3.SoftInputTables(torch.randn(5, 8), torch.randn(10, 8), torch.randn(10, info.hidden_size))
    return scorer, tables


def _train_stage3(tiny_backbone_dir, **settings) -> dict:
    scorer, tables = _tiny_sella(tiny_backbone_dir)
    cfg = Stage3Config(batch_size=2, **settings)
    return stage3.train_stage3(scorer, tables, _frame(), cfg, 0, progress=False)


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_both_stages_record_the_losses_of_the_shared_loop(stage, tiny_backbone_dir, tmp_path, monkeypatch):
    spy = Spy()
    module = stage1 if stage == "stage1" else stage3
    monkeypatch.setattr(module, "run_epochs", spy)
    if stage == "stage1":
        metrics = _train_stage1(tiny_backbone_dir, tmp_path)
    else:
        metrics = _train_stage3(tiny_backbone_dir)
    assert spy.names == [stage]
    assert metrics["losses"] == spy.seen and len(spy.seen) == 3  # 5 rows, batches of 2
    assert metrics["rows"] == 5


def test_stage3_clips_its_gradients_at_the_configured_bound(tiny_backbone_dir, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("max_grad_norm"))
        return run_epochs(*args, **kwargs)

    monkeypatch.setattr(stage3, "run_epochs", spy)
    free = _train_stage3(tiny_backbone_dir)
    clipped = _train_stage3(tiny_backbone_dir, max_grad_norm=1e-3)
    assert seen == [None, 1e-3]
    assert len(free["grad_norms"]) == 3 and all(n > 1e-3 for n in free["grad_norms"])
    assert clipped["grad_norms"][0] == pytest.approx(free["grad_norms"][0], rel=1e-4)  # same first step
    assert clipped["losses"][1:] != free["losses"][1:]  # then the smaller steps show


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_a_broken_stage_loss_reaches_the_caller(stage, tiny_backbone_dir, tmp_path, monkeypatch):
    module = stage1 if stage == "stage1" else stage3
    monkeypatch.setattr(module, "run_epochs", Spy(broken=True))
    with pytest.raises(FloatingPointError, match=f"{stage}: broken loss"):
        if stage == "stage1":
            _train_stage1(tiny_backbone_dir, tmp_path)
        else:
            _train_stage3(tiny_backbone_dir)


def _rates(schedule: str | None, warmup: int | None, steps: int) -> list[float]:
    model, optimizer = _linear()
    scheduler = loop.lr_scheduler(optimizer, schedule, warmup, lambda: steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return rates


def test_unset_schedule_keeps_the_rate_constant():
    assert _rates(None, None, 10) == [0.5] * 10


def test_warm_up_alone_ramps_then_holds_the_rate_as_stage1_did():
    # Stage 1's former LambdaLR: factor min(1, (step + 1) / (warmup + 1)).
    expected = [0.5 * min(1.0, (k + 1) / 5) for k in range(10)]
    assert _rates(None, 4, 10) == pytest.approx(expected)


def test_steps_are_counted_only_for_a_decaying_schedule():
    _, optimizer = _linear()
    counted = []
    loop.lr_scheduler(optimizer, None, 4, lambda: counted.append(1) or 10)
    assert counted == []
    loop.lr_scheduler(optimizer, "cosine", 4, lambda: counted.append(1) or 10)
    assert counted == [1]


def test_cosine_schedule_warms_up_then_decays_to_zero_by_the_last_step():
    rates = _rates("cosine", 4, 20)
    assert rates[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])  # linear warm-up to the peak
    assert all(a > b for a, b in zip(rates[4:], rates[5:], strict=False))  # then strictly down
    assert rates[-1] < 0.01 * 0.5
    assert _rates("cosine", None, 10)[0] == pytest.approx(0.5)  # no warm-up: starts at the peak


def test_an_unknown_schedule_is_refused():
    _, optimizer = _linear()
    with pytest.raises(ValueError, match="lr_schedule"):
        loop.lr_scheduler(optimizer, "step", 0, lambda: 10)


def test_stage3_runs_its_schedule_over_exactly_its_steps(tiny_backbone_dir, monkeypatch):
    seen = {}
    real = loop.lr_scheduler

    def spy(optimizer, schedule, warmup, steps):
        seen.update(schedule=schedule, warmup=warmup, steps=steps())
        seen["scheduler"] = real(optimizer, schedule, warmup, steps)
        seen["optimizer"] = optimizer
        return seen["scheduler"]

    monkeypatch.setattr(stage3, "lr_scheduler", spy)
    scorer, tables = _tiny_sella(tiny_backbone_dir)
    cfg = Stage3Config(batch_size=2, epochs=2, lr=1e-2, lr_schedule="cosine", warmup_steps=1)
    metrics = stage3.train_stage3(scorer, tables, _frame(), cfg, 0, progress=False)
    assert seen["schedule"] == "cosine" and seen["warmup"] == 1
    assert seen["steps"] == len(metrics["losses"])  # the count matches the batches actually run
    assert seen["optimizer"].param_groups[0]["lr"] < 1e-2 * 0.01  # decayed to ~0 at the end


@pytest.mark.parametrize("table_lr", [None, 0.0, 1e-4])
def test_stage3_trains_the_tables_at_their_own_rate(table_lr, tiny_backbone_dir):
    scorer, tables = _tiny_sella(tiny_backbone_dir)
    before = {k: v.detach().clone() for k, v in tables.state_dict().items()}
    proj_before = scorer.proj_c.net[0].weight.detach().clone()
    cfg = Stage3Config(batch_size=2, lr=1e-2, table_lr=table_lr)
    stage3.train_stage3(scorer, tables, _frame(), cfg, 0, progress=False)
    moved = {k: (v - before[k]).abs().max().item() for k, v in tables.state_dict().items()}
    if table_lr == 0.0:
        assert all(m == 0.0 for m in moved.values())  # frozen: stage 2's tables as they were
    else:
        # Adam moves a touched element by about its rate per step: 1e-2 (the shared rate) or 1e-4.
        rate = 1e-2 if table_lr is None else table_lr
        assert 0.3 * rate < max(moved.values()) < 20 * rate
    assert not torch.equal(scorer.proj_c.net[0].weight, proj_before)  # the projections train in every case


def test_a_negative_table_rate_is_refused(tiny_backbone_dir):
    model, tok, info = load_backbone(str(tiny_backbone_dir))
    scorer = SellaRec(model, tok, TemplateSpec(), proj_c=CollabProjector(8, info.hidden_size))
    tables = stage3.SoftInputTables(torch.randn(5, 8), torch.randn(10, 8), None)
    with pytest.raises(ValueError, match="table_lr"):
        stage3.train_stage3(scorer, tables, _frame(), Stage3Config(table_lr=-1.0), 0, progress=False)


def test_centered_semantic_inputs_fold_into_the_plain_layer():
    torch.manual_seed(0)
    semantic = 40.0 * torch.randn(1, 16) + torch.randn(50, 16)  # one shared direction, small spread
    centered = stage3.CenteredInputs.over(torch.nn.Linear(16, 12), semantic)
    assert torch.allclose(centered.mean, semantic.mean(0))
    assert torch.allclose((semantic - centered.mean).norm(dim=1).median(), torch.tensor(centered.spread))
    folded = centered.folded()
    assert type(folded) is torch.nn.Linear
    assert torch.allclose(folded(semantic), centered(semantic), atol=1e-4)
    fresh = torch.randn(7, 16) * 30  # rows it never saw: the same map, not a fit to the table
    assert torch.allclose(folded(fresh), centered(fresh), atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="spread"):
        stage3.CenteredInputs(torch.nn.Linear(16, 12), semantic[0], 0.0)


@pytest.mark.parametrize("inputs", [None, "centered"])
def test_stage3_with_centered_semantics_saves_a_plain_projection(inputs, tiny_backbone_dir, monkeypatch):
    folds = []
    fold = stage3.CenteredInputs.folded
    monkeypatch.setattr(stage3.CenteredInputs, "folded", lambda self: folds.append(self) or fold(self))
    torch.manual_seed(0)
    model, tok, info = load_backbone(str(tiny_backbone_dir))
    scorer = SellaRec(
        model,
        tok,
        TemplateSpec(),
        proj_c=CollabProjector(8, info.hidden_size),
        proj_w=SemanticProjector(info.hidden_size),
    )
    semantic = 20.0 * torch.randn(1, info.hidden_size) + torch.randn(10, info.hidden_size)
    tables = stage3.SoftInputTables(torch.randn(5, 8), torch.randn(10, 8), semantic)
    init = scorer.proj_w.net.weight.detach().clone()
    cfg = Stage3Config(batch_size=2, lr=1e-2, semantic_inputs=inputs)
    stage3.train_stage3(scorer, tables, _frame(), cfg, 0, progress=False)
    # Either way the bundle's Proj W->L is a plain Linear with the keys the service loads.
    assert type(scorer.proj_w.net) is torch.nn.Linear
    assert set(scorer.proj_w.state_dict()) == {"net.weight", "net.bias", "out_norm"}
    assert len(folds) == (inputs == "centered")
    if folds:  # the stored layer is the map trained on centred inputs, and that one learned
        trained = folds[0]
        x = tables.semantic.detach()
        assert torch.allclose(scorer.proj_w.net(x), trained(x), atol=1e-4)
        assert trained.spread < 0.2 * float(x.norm(dim=1).median())  # the spread, not the shared part
        assert not torch.equal(trained.linear.weight, init)
    else:
        assert not torch.equal(scorer.proj_w.net.weight, init)


def test_an_unknown_semantic_input_mode_is_refused(tiny_backbone_dir):
    model, tok, info = load_backbone(str(tiny_backbone_dir))
    scorer = SellaRec(model, tok, TemplateSpec(), proj_c=CollabProjector(8, info.hidden_size))
    tables = stage3.SoftInputTables(torch.randn(5, 8), torch.randn(10, 8), None)
    with pytest.raises(ValueError, match="semantic_inputs"):
        cfg = Stage3Config(semantic_inputs="whiten")
        stage3.train_stage3(scorer, tables, _frame(), cfg, 0, progress=False)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_named_groups_record_their_own_gradient_norms_which_make_up_the_global_one(
    tiny_backbone_dir, max_grad_norm
):
    """Before any clipping, as the global norm is."""
    metrics = _train_stage3(tiny_backbone_dir, max_grad_norm=max_grad_norm)
    groups = metrics["group_grad_norms"]
    assert set(groups) == {"tables", "proj_c", "proj_w"}
    assert all(len(norms) == len(metrics["grad_norms"]) == 3 for norms in groups.values())
    assert all(n > 0 for norms in groups.values() for n in norms)
    for step, total_norm in enumerate(metrics["grad_norms"]):
        parts = torch.tensor([groups[name][step] for name in groups])
        assert float(parts.norm()) == pytest.approx(total_norm, rel=1e-5)


def test_frozen_tables_record_no_gradient_group(tiny_backbone_dir):
    metrics = _train_stage3(tiny_backbone_dir, table_lr=0.0)
    assert set(metrics["group_grad_norms"]) == {"proj_c", "proj_w"}


def test_stage3_shows_the_neutral_user_on_the_configured_share_of_rows(tiny_backbone_dir, monkeypatch):
    seen = []
    real = stage3.split_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("neutral"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stage3, "split_loss", spy)
    _train_stage3(tiny_backbone_dir)
    assert seen and all(s is None for s in seen)
    seen.clear()
    _train_stage3(tiny_backbone_dir, neutral_user_rate=0.5)
    flags = torch.cat(seen)
    assert len(flags) == 5 and 0 < int(flags.sum()) < 5  # 5 rows, seeded: some of each


def test_stage1_starts_from_the_same_lora_whatever_loading_the_backbone_drew(
    tiny_backbone_dir, tmp_path, monkeypatch
):
    # A first load converts the GGUF backbone and draws random numbers doing so; a later one
    # reads the converted copy. The LoRA must not start elsewhere on a fresh machine.
    from safetensors.torch import load_file

    real, draws = stage1.load_backbone, iter([0, 1000])

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        torch.rand(next(draws))
        return loaded

    monkeypatch.setattr(stage1, "load_backbone", load)
    adapters = []
    for name in ("fresh", "warm"):
        _train_stage1(tiny_backbone_dir, tmp_path / name)
        adapters.append(load_file(next((tmp_path / name / "adapter").glob("*.safetensors"))))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


def _weights_after_each_step(epochs: int) -> list[torch.Tensor]:
    """The reference: the same SGD run by hand, its weights and bias after every step."""
    model, optimizer = _linear()
    seen = []
    for _ in range(epochs):
        for batch in BATCHES:
            optimizer.zero_grad()
            _bce(model)(batch, len(batch)).backward()
            optimizer.step()
            seen.append(torch.cat([model.weight.detach().flatten(), model.bias.detach()]))
    return seen


@pytest.mark.parametrize("start", [0, 2, 5])
def test_the_tail_average_ends_the_loop_at_the_mean_weights_after_its_start(start):
    model, optimizer = _linear()
    params = list(model.parameters())
    average = loop.TailAverage(params, start=start)
    run_epochs("test", 3, lambda: BATCHES, _bce(model), optimizer, params, progress=False, average=average)

    steps = _weights_after_each_step(3)
    expected = torch.stack(steps[start:]).mean(0)
    got = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    assert average.steps == 6 and average.averaged == 6 - start
    assert torch.allclose(got, expected, atol=1e-6)
    if start < 5:  # a real average of several steps is not the last step's weights
        assert not torch.allclose(got, steps[-1], atol=1e-4)


def test_a_tail_average_that_starts_after_the_last_step_leaves_the_last_weights():
    model, optimizer = _linear()
    params = list(model.parameters())
    average = loop.TailAverage(params, start=100)
    run_epochs("test", 3, lambda: BATCHES, _bce(model), optimizer, params, progress=False, average=average)
    assert average.averaged == 0
    got = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    assert torch.equal(got, _weights_after_each_step(3)[-1])


def test_a_tail_average_cannot_start_before_the_first_step():
    with pytest.raises(ValueError, match="average"):
        loop.TailAverage([], start=-1)


def _stage3_with_average(tiny_backbone_dir, average_from):
    scorer, tables = _tiny_sella(tiny_backbone_dir)
    cfg = Stage3Config(batch_size=2, epochs=2, lr=1e-2, average_from=average_from)
    stage3.train_stage3(scorer, tables, _frame(), cfg, 0, progress=False)
    return scorer, tables


def test_stage3_averages_every_trained_weight_over_its_last_steps(tiny_backbone_dir, monkeypatch):
    seen = {}

    def spy(*args, **kwargs):
        seen["average"] = kwargs.get("average")
        seen["params"] = args[5]
        return run_epochs(*args, **kwargs)

    monkeypatch.setattr(stage3, "run_epochs", spy)
    _, last = _stage3_with_average(tiny_backbone_dir, None)
    assert seen["average"] is None
    scorer, averaged = _stage3_with_average(tiny_backbone_dir, 0.5)
    average = seen["average"]
    assert average.steps == 6 and average.start == 3 and average.averaged == 3  # 5 rows in 2s, 2 epochs
    assert average.params == seen["params"]  # the tables and both projections: all that the optimiser trains
    assert any(p is scorer.proj_w.net.weight for p in average.params)
    assert not torch.allclose(averaged.users, last.users)  # it ends elsewhere than the last step


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_stage3_refuses_an_average_outside_the_steps(tiny_backbone_dir, bad):
    with pytest.raises(ValueError, match="average_from"):
        _stage3_with_average(tiny_backbone_dir, bad)
