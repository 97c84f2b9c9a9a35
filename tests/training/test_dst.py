"""Dynamic sparse training: invariants, drop/grow choices, optimizer state, schedule."""

import pytest
import torch
from torch import nn

from padst_compiler.training import NM, Block, Diagonal, DSTScheduler, PADSTLinear, Unstructured, sparsify
from padst_compiler.training.dst import drop_fraction_at, plan_update

STRUCTURES = [Block(4, 4), NM(4), Diagonal(), Unstructured()]


def test_cosine_drop_schedule():
    assert drop_fraction_at(0, 0.3, 100) == pytest.approx(0.3)
    assert drop_fraction_at(50, 0.3, 100) == pytest.approx(0.15)
    assert drop_fraction_at(100, 0.3, 100) == pytest.approx(0.0)
    assert drop_fraction_at(101, 0.3, 100) == 0.0


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_plan_update_drops_smallest_and_grows_best_in_the_same_groups(structure):
    gen = torch.Generator().manual_seed(0)
    weight = structure.project(torch.randn(16, 32, generator=gen), 0.5)
    mask = structure.index_to_units(weight.index, 16, 32)
    magnitude = structure.unit_scores(weight.to_dense().square())
    scores = torch.rand(mask.shape, generator=gen)
    new, survivors = plan_update(structure, weight.values, weight.index, 16, 32, 3, scores)
    assert torch.equal(new.sum(1), mask.sum(1))  # the invariant: same count in every group
    dropped = mask & ~survivors
    assert int(dropped.sum()) == 3
    assert magnitude[dropped].max() <= magnitude[survivors].min()
    grown = new & ~mask
    assert int(grown.sum()) == 3 and torch.equal(grown.sum(1), dropped.sum(1))
    for group in grown.nonzero()[:, 0].unique():
        passed_over = scores[group][~mask[group] & ~grown[group]]
        if passed_over.numel():
            assert scores[group][grown[group]].min() >= passed_over.max()


def make_layer(structure, permutation="none", bias=False, **options):
    torch.manual_seed(0)
    return nn.Sequential(PADSTLinear(32, 16, structure, 0.5, permutation=permutation, bias=bias, **options))


def one_step(model, optimizer, sched, x):
    loss = model(x).square().mean() + sched.permutation_penalty()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sched.step()


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
@pytest.mark.parametrize("growth", ["rigl", "set"])
def test_update_keeps_survivors_zeroes_new_units_and_moves_optimizer_state(structure, growth):
    model = make_layer(structure)
    layer = model[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DSTScheduler(model, optimizer, total_steps=100, update_every=3, growth=growth)
    x = torch.randn(64, 32)
    for _ in range(2):
        one_step(model, optimizer, sched, x)
    before = layer.dense_weight().detach().clone()
    state_before = structure.expand(optimizer.state[layer.values]["exp_avg"], layer.index, 16, 32).clone()
    values_ptr, index_before = layer.values.data_ptr(), layer.index.clone()
    one_step(model, optimizer, sched, x)  # step 3: optimizer step, then the mask update
    after = layer.dense_weight().detach()
    state_after = structure.expand(optimizer.state[layer.values]["exp_avg"], layer.index, 16, 32)
    assert layer.values.data_ptr() == values_ptr and layer.index.shape == index_before.shape
    assert not torch.equal(layer.index, index_before)
    old_mask = structure.index_to_units(index_before, 16, 32)
    new_mask = structure.index_to_units(layer.index, 16, 32)
    assert torch.equal(new_mask.sum(1), old_mask.sum(1))
    grown = structure.units_to_dense(new_mask & ~old_mask, 16, 32)
    assert bool((after[grown] == 0).all()) and bool((state_after[grown] == 0).all())
    survived = structure.units_to_dense(new_mask & old_mask, 16, 32)
    assert not bool((after[survived] == before[survived]).all())  # the optimizer step moved them ...
    assert bool((state_after[survived] != 0).any())  # ... and their Adam state travelled with them
    assert bool((state_after[survived] != state_before[survived]).any())


def test_rigl_grows_where_the_dense_gradient_is_largest():
    model = make_layer(Block(4, 4))
    layer = model[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the update moves anything
    sched = DSTScheduler(model, optimizer, total_steps=10, update_every=1, drop_fraction=0.5, t_end=1.0)
    x = torch.randn(64, 32)
    target = torch.randn(64, 16)
    assert layer.capture_dense_grad
    loss = (model(x) - target).square().mean()
    loss.backward()
    dense_grad = layer.dense_grad.clone()
    old_mask = Block(4, 4).index_to_units(layer.index, 16, 32)
    sched.step()
    new_mask = Block(4, 4).index_to_units(layer.index, 16, 32)
    grown = new_mask & ~old_mask
    scores = Block(4, 4).unit_scores(dense_grad.square())
    for row in range(4):
        free = ~old_mask[row]
        best = scores[row][free].topk(int(grown[row].sum())).values
        torch.testing.assert_close(scores[row][grown[row]].sort().values, best.sort().values)


def test_dense_gradient_capture_matches_autograd():
    layer = PADSTLinear(32, 16, NM(4), 0.5, permutation="random", side="input")
    layer.capture_dense_grad = True
    x = torch.randn(8, 32)
    layer(x).square().sum().backward()
    dense = layer.dense_weight().detach().requires_grad_()
    y = torch.nn.functional.linear(x[:, layer.perm_index], dense, layer.bias.detach())
    expected = torch.autograd.grad(y.square().sum(), dense)[0]
    torch.testing.assert_close(layer.dense_grad, expected)


def test_set_growth_is_seeded():
    def final_index(seed):
        model = make_layer(NM(4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = DSTScheduler(model, optimizer, total_steps=10, update_every=2, growth="set", seed=seed)
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
        for _ in range(4):
            one_step(model, optimizer, sched, x)
        return model[0].index.clone()

    assert torch.equal(final_index(0), final_index(0))
    assert not torch.equal(final_index(0), final_index(1))


def _snapshot(model, optimizer, sched):
    tensors = {name: t.clone() for name, t in (*model.named_parameters(), *model.named_buffers())}
    moments = [(id(p), key, v.clone() if torch.is_tensor(v) else v)
               for p, state in optimizer.state.items() for key, v in state.items()]
    return tensors, moments, sched.step_count


def _same(a, b) -> bool:
    (tensors_a, moments_a, step_a), (tensors_b, moments_b, step_b) = a, b
    return step_a == step_b and tensors_a.keys() == tensors_b.keys() \
        and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a) and len(moments_a) == len(moments_b) \
        and all(x[:2] == y[:2] and (torch.equal(x[2], y[2]) if torch.is_tensor(x[2]) else x[2] == y[2])
                for x, y in zip(moments_a, moments_b))


def test_rigl_without_a_backward_pass_is_explained_and_changes_nothing():
    """The second layer lacks its gradient: the first layer's mask must not have moved, nor
    the step count, and the step runs once the gradient is there."""
    torch.manual_seed(0)
    model = nn.Sequential(PADSTLinear(32, 32, Block(4, 4), 0.5), PADSTLinear(32, 16, Block(4, 4), 0.5))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = DSTScheduler(model, optimizer, total_steps=10, update_every=2, t_end=1.0)
    x = torch.randn(8, 32)
    one_step(model, optimizer, sched, x)  # step 1; step 2 updates the masks
    model(x).sum().backward()
    optimizer.step()
    model[1].dense_grad = None
    before = _snapshot(model, optimizer, sched)
    with pytest.raises(RuntimeError, match="layer '1': no dense gradient was captured for the RigL update at step 2"):
        sched.step()
    assert _same(before, _snapshot(model, optimizer, sched))
    model(x).sum().backward()
    sched.step()
    assert sched.step_count == 2 and not torch.equal(before[0]["0.index"], model[0].index)


@pytest.mark.parametrize("growth", ["rigl", "set"])
@pytest.mark.parametrize("frozen", [0, 1])
def test_a_frozen_layer_keeps_its_mask_and_values_while_the_others_move(growth, frozen):
    """A layer whose values do not train (fine-tuning part of a model) is no DST layer: RigL
    captured nothing for it (the first layer's output has no graph to hook) and SET moved it."""
    torch.manual_seed(0)
    model = nn.Sequential(PADSTLinear(32, 32, Block(4, 4), 0.5), nn.ReLU(), PADSTLinear(32, 16, Block(4, 4), 0.5))
    layers = [model[0], model[2]]
    layers[frozen].requires_grad_(False)
    before = {name: t.clone() for name, t in layers[frozen].state_dict().items()}
    trained_index = layers[1 - frozen].index.clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = DSTScheduler(model, optimizer, total_steps=10, update_every=2, t_end=1.0, growth=growth)
    x = torch.randn(8, 32)
    for _ in range(6):
        one_step(model, optimizer, sched, x)
    assert all(torch.equal(before[name], t) for name, t in layers[frozen].state_dict().items())
    assert not torch.equal(trained_index, layers[1 - frozen].index)
    assert layers[frozen].warming_up and not layers[1 - frozen].warming_up  # hardened at step 1
    layers[frozen].requires_grad_(True)  # trains again: hardens at its next step, past the hardening step
    optimizer.add_param_group({"params": list(layers[frozen].parameters())})
    one_step(model, optimizer, sched, x)
    assert not layers[frozen].warming_up


def test_scheduler_hardens_at_the_configured_fraction_and_penalty_vanishes():
    model = make_layer(Block(4, 4), permutation="learned")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = DSTScheduler(model, optimizer, total_steps=10, harden_at=0.3, harden_threshold=0.0)
    x = torch.randn(16, 32)
    for step in range(1, 5):
        one_step(model, optimizer, sched, x)
        assert model[0].soft == (step < 3)
    assert sched.permutation_penalty().item() == 0
    assert sorted(model[0].perm_index.tolist()) == list(range(16))


@pytest.mark.parametrize("options,message", [
    ({"growth": "random"}, "growth must be one of"),
    ({"update_every": 0}, "update_every must be a positive integer"),
    ({"t_end": 1.5}, r"t_end must be in \[0, 1\]"),
    ({"reselect_at": (0.5, 1.0)}, r"reselect_at must hold fractions of the warm-up in \(0, 1\)"),
])
def test_scheduler_rejects_bad_options(options, message):
    model = make_layer(Block(4, 4))
    with pytest.raises(ValueError, match=message):
        DSTScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, **options)
    with pytest.raises(ValueError, match="no PADSTLinear layer: call sparsify"):
        DSTScheduler(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), total_steps=10)


def test_scheduler_finds_layers_inside_wrappers():
    inner = sparsify(nn.Sequential(nn.Linear(32, 32)), Block(4, 4), 0.5)
    wrapped = nn.ModuleDict({"module": inner})
    sched = DSTScheduler(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), total_steps=10)
    assert [name for name, _ in sched.layers] == ["module.0"]


@pytest.mark.parametrize("mode", ["learned", "birkhoff"])
def test_hardening_drops_the_optimizer_state_it_made_stale(mode):
    """The refitted values and the freed warm-up weight or soft matrix lose their state (Adam
    then restarts its bias correction); the input-side bias, unchanged, keeps its moments."""
    model = make_layer(Block(4, 4), permutation=mode, side="input", bias=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DSTScheduler(model, optimizer, total_steps=10, harden_at=0.2, update_every=100)
    x = torch.randn(16, 32)
    one_step(model, optimizer, sched, x)
    layer = model[0]
    learned = layer.dense_weight_proxy if mode == "learned" else layer.soft_perm
    assert layer.soft and learned in optimizer.state
    one_step(model, optimizer, sched, x)  # step 2 hardens
    assert not layer.soft
    assert layer.values not in optimizer.state and learned not in optimizer.state
    assert bool(optimizer.state[layer.bias]["exp_avg"].any())
    one_step(model, optimizer, sched, x)
    assert optimizer.state[layer.values]["step"] == 1


def test_rigl_gradient_is_consumed_by_each_update():
    model = make_layer(NM(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DSTScheduler(model, optimizer, total_steps=20, update_every=1, t_end=1.0)
    x = torch.randn(8, 32)
    one_step(model, optimizer, sched, x)
    assert model[0].capture_dense_grad and model[0].dense_grad is None


def test_penalty_weight_zero_means_no_penalty_and_other_options_are_checked():
    model = make_layer(Block(4, 4), permutation="learned")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert DSTScheduler(model, optimizer, total_steps=10, penalty_weight=0).permutation_penalty().item() == 0
    with pytest.raises(ValueError, match=r"harden_threshold must be in \[0, 1\)"):
        DSTScheduler(model, optimizer, total_steps=10, harden_threshold=2)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        DSTScheduler(model, optimizer, total_steps=True)


def test_a_model_hundreds_of_layers_deep_warms_up_hardens_and_trains_on():
    """256 learned layers: every one hardens at its step, frees its dense copy and its optimizer
    state, and training goes on sparse with moving masks."""
    torch.manual_seed(0)
    model = nn.Sequential(*[module for _ in range(256) for module in (nn.Linear(64, 64), nn.Tanh())])
    sparsify(model, Block(8, 8), 0.875)  # permutation="learned" by default
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = DSTScheduler(model, optimizer, total_steps=20, update_every=2)  # warm-up: 2 steps
    x = torch.randn(8, 64)
    initial = [layer.index.clone() for _, layer in sched.layers]
    for step in range(6):
        one_step(model, optimizer, sched, x)
        assert all(layer.soft for _, layer in sched.layers) == (step < 1)
    layers = [layer for _, layer in sched.layers]
    assert len(layers) == 256 and all(layer.dense_weight_proxy.numel() == 0 for layer in layers)
    assert not any(param.numel() == 0 for param in optimizer.state)
    assert sum(not torch.equal(layer.index, start) for layer, start in zip(layers, initial)) > 128
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("reselect_at,expected", [((0.5, 0.75), [5, 8]), ((), [])])
def test_learned_permutations_are_reselected_at_the_chosen_fractions_of_the_warm_up(monkeypatch, reselect_at,
                                                                                      expected):
    from padst_compiler.training import PADSTLinear

    model = make_layer(Block(4, 4), permutation="learned")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = DSTScheduler(model, optimizer, total_steps=100, reselect_at=reselect_at)  # warm-up: 10 steps
    steps = []
    original = PADSTLinear.reselect_permutation
    monkeypatch.setattr(PADSTLinear, "reselect_permutation", lambda layer: steps.append(sched.step_count)
                        or original(layer))
    for _ in range(12):
        one_step(model, optimizer, sched, torch.randn(8, 32))
    assert steps == expected


def _birkhoff_run(penalty_in_loss: bool, steps: int = 6):
    model = make_layer(Block(4, 4), permutation="birkhoff", soft_noise=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DSTScheduler(model, optimizer, total_steps=40, update_every=3, harden_at=0.9, harden_threshold=0.0)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(x).square().mean()
        if penalty_in_loss:
            loss = loss + sched.permutation_penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sched.step()
    return model, optimizer, sched


def test_permutation_penalty_needs_no_loss_term_and_is_counted_once():
    plain, _, _ = _birkhoff_run(penalty_in_loss=False)
    surgery, _, _ = _birkhoff_run(penalty_in_loss=True)
    torch.testing.assert_close(dict(plain.named_parameters()), dict(surgery.named_parameters()))
    assert plain[0].soft  # still learning its matrix: the penalty was in play every step


def test_penalty_hook_adds_the_penalty_gradient_and_stays_out_of_a_logged_penalty():
    model = make_layer(Block(4, 4), permutation="birkhoff", soft_noise=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = DSTScheduler(model, optimizer, total_steps=40, penalty_weight=2.0)
    matrix = model[0].soft_perm
    with torch.no_grad():
        sched.permutation_penalty()  # logged only: must not stop the hook
    expected = torch.autograd.grad(sched.permutation_penalty(), matrix)[0]
    sched._penalty_backpropagated = False  # autograd.grad above fired the tensor hook
    optimizer.step()
    torch.testing.assert_close(matrix.grad, expected)


def test_a_replaced_scheduler_adds_nothing():
    model = make_layer(Block(4, 4), permutation="birkhoff", soft_noise=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    DSTScheduler(model, optimizer, total_steps=40)  # dropped at once: its hook goes with it
    sched = DSTScheduler(model, optimizer, total_steps=40)
    optimizer.step()
    expected = torch.autograd.grad(sched.permutation_penalty(), model[0].soft_perm)[0]
    torch.testing.assert_close(model[0].soft_perm.grad, expected)


def test_of_two_live_schedulers_on_one_optimizer_only_the_newest_adds_the_penalty():
    model = make_layer(Block(4, 4), permutation="birkhoff", soft_noise=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    older = DSTScheduler(model, optimizer, total_steps=40)  # noqa: F841  (kept alive on purpose)
    newest = DSTScheduler(model, optimizer, total_steps=40)
    optimizer.step()
    expected = torch.autograd.grad(newest.permutation_penalty(), model[0].soft_perm)[0]
    torch.testing.assert_close(model[0].soft_perm.grad, expected)
