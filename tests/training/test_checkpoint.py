"""Checkpoints hold everything a run needs, resume to the same numbers, and never load half-way."""

import pytest
import torch
from torch import nn

from padst_compiler.training import NM, Block, DSTScheduler, sparsify

TOTAL = 24


def build(structure=Block(4, 4), seed=0, sparsity=0.5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    sparsify(model, structure, sparsity, permutation="learned", seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DSTScheduler(model, optimizer, total_steps=TOTAL, update_every=4, harden_at=0.5,
                         harden_threshold=0.0)
    return model, optimizer, sched


def train(model, optimizer, sched, start, stop):
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(1000 + step)
        x, target = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
        loss = (model(x) - target).square().mean() + sched.permutation_penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sched.step()


@pytest.mark.parametrize("stop_at", [6, 17], ids=["while-soft", "after-hardening"])
def test_resumed_run_matches_the_uninterrupted_run(tmp_path, stop_at):
    reference = build()
    train(*reference, 0, TOTAL)

    first = build()
    train(*first, 0, stop_at)
    model, optimizer, sched = first
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "sched": sched.state_dict()}, path)

    resumed = build(seed=7)  # a fresh model: other initial values, masks and permutations
    checkpoint = torch.load(path, weights_only=True)
    resumed[0].load_state_dict(checkpoint["model"])
    resumed[1].load_state_dict(checkpoint["optimizer"])
    resumed[2].load_state_dict(checkpoint["sched"])
    assert [layer.soft for _, layer in resumed[2].layers] == [layer.soft for _, layer in sched.layers]
    train(*resumed, stop_at, TOTAL)

    want, got = reference[0].state_dict(), resumed[0].state_dict()
    assert want.keys() == got.keys()
    for key in want:
        if torch.is_tensor(want[key]):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
        else:
            assert got[key] == want[key], key


@pytest.mark.parametrize("other", [NM(4), Block(8, 8)], ids=str)
def test_mismatched_structure_fails_by_layer_and_leaves_the_model_untouched(tmp_path, other):
    saved, *_ = build(Block(4, 4))
    path = tmp_path / "block.pt"
    torch.save(saved.state_dict(), path)
    model, *_ = build(other, seed=3)
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="checkpoint does not match layer '0'.*nothing was loaded"):
        model.load_state_dict(torch.load(path, weights_only=True))
    after = model.state_dict()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(after[key], value), key


def test_mismatched_sparsity_and_missing_entries_are_named(tmp_path):
    saved, *_ = build(Block(4, 4), sparsity=0.5)
    model, *_ = build(Block(4, 4), sparsity=0.6)  # keeps the same 2 of 4 blocks: equal shapes
    with pytest.raises(ValueError, match="layer '0': it was saved with sparsity=0.5, the model has 0.6"):
        model.load_state_dict(saved.state_dict())
    model, *_ = build(NM(4), sparsity=0.75)
    with pytest.raises(ValueError, match=r"layer '0': 0.values is \(32, 8\) torch.float32 in the checkpoint, "
                                         r"\(32, 4\) torch.float32 in the model"):
        model.load_state_dict(build(NM(4), sparsity=0.5)[0].state_dict())
    state = build(NM(4))[0].state_dict()
    del state["2.values"]
    with pytest.raises(ValueError, match="checkpoint has no entry '2.values'"):
        build(NM(4))[0].load_state_dict(state)


def test_scheduler_checkpoint_with_other_options_is_refused():
    *_, sched = build()
    other = DSTScheduler(build()[0], torch.optim.SGD(build()[0].parameters(), lr=0.1), total_steps=99)
    with pytest.raises(ValueError, match="saved with total_steps=24, this scheduler has 99"):
        other.load_state_dict(sched.state_dict())


@pytest.mark.parametrize("extra", [torch.tensor([1, 2, 255], dtype=torch.uint8), torch.zeros(3),
                                   torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)], ids=["bytes", "float", "list"])
def test_an_unreadable_extra_state_tensor_is_refused_and_nothing_loaded(extra):
    source, _, _ = build(seed=0)
    target, _, _ = build(seed=1)
    state = source.state_dict()
    state["0._extra_state"] = extra
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError, match="layer '0'.*not a PADSTLinear state; nothing was loaded"):
        target.load_state_dict(state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_state_dict_holds_only_tensors_and_old_dict_states_still_load():
    source, _, _ = build(seed=0)
    state = source.state_dict()
    assert all(torch.is_tensor(value) for value in state.values())
    state["0._extra_state"] = source[0].state_record()  # a checkpoint from before the tensor encoding
    target, _, _ = build(seed=1)
    target.load_state_dict(state)
    assert target[0].state_record() == source[0].state_record()


def _sharded_run(structure=Block(4, 4), update_every=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    sparsify(model, structure, 0.5, permutation="learned")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DSTScheduler(model, optimizer, total_steps=TOTAL, update_every=update_every, harden_at=0.5,
                         harden_threshold=0.0)
    return model, optimizer, sched


@pytest.mark.parametrize("other", ["structure", "scheduler options"])
def test_load_sharded_refuses_another_run_before_changing_anything(tmp_path, other):
    from padst_compiler.training.sharded_checkpoint import load_sharded, save_sharded

    run = _sharded_run()
    train(*run, 0, 3)
    save_sharded(tmp_path / "ckpt", *run)
    target = _sharded_run(NM(4)) if other == "structure" else _sharded_run(update_every=5)
    before = {key: value.clone() for key, value in target[0].state_dict().items()}
    with pytest.raises(ValueError, match="nothing was loaded"):
        load_sharded(tmp_path / "ckpt", *target)
    for key, value in target[0].state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not target[1].state and target[2].step_count == 0


def test_load_sharded_resumes_a_single_process_run_to_the_same_numbers(tmp_path):
    from padst_compiler.training.sharded_checkpoint import load_sharded, save_sharded

    reference = _sharded_run()
    train(*reference, 0, TOTAL)
    first = _sharded_run()
    train(*first, 0, 5)  # still warming up: the sparse values have no optimizer state yet
    save_sharded(tmp_path / "ckpt", *first)
    resumed = _sharded_run()
    start = load_sharded(tmp_path / "ckpt", *resumed)
    assert start == 5
    train(*resumed, start, TOTAL)
    for key, value in reference[0].state_dict().items():
        assert torch.equal(resumed[0].state_dict()[key], value), key


def test_a_wrapper_built_later_loads_all_or_nothing_once_guarded():
    from padst_compiler.training import guard_checkpoints

    def wrapped(seed):
        model, _, _ = build(seed=seed)
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 16), model)  # the dense layer loads before the sparse model

    state = wrapped(0).state_dict()
    state["1.2.values"] = state["1.2.values"][:1]  # does not fit the last PA-DST layer
    unguarded = wrapped(1)
    before = unguarded[0].weight.clone()
    with pytest.raises(ValueError, match="layer '2'"):
        unguarded.load_state_dict(state)
    assert not torch.equal(unguarded[0].weight, before)  # torch copied the wrapper's own layer first

    target = wrapped(1)
    guard_checkpoints(target)
    snapshot = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '1\.2'.*nothing was loaded"):
        target.load_state_dict(state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, snapshot[key]), key


def test_a_diverged_weight_is_refused_before_any_layer_hardens():
    from padst_compiler.training import harden_permutations

    model, optimizer, sched = build()
    with torch.no_grad():
        model[2].dense_weight_proxy[0, 0] = float("nan")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer '2'.*NaN or inf.*nothing was changed"):
        harden_permutations(model)
    sched.step_count = sched.harden_step - 1
    with pytest.raises(ValueError, match="layer '2'.*NaN or inf"):
        sched.step()
    assert sched.step_count == sched.harden_step - 1 and model[0].soft and model[2].soft
    for key, value in model.state_dict().items():
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()), key  # (the planted NaN stays)
