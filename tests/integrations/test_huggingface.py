"""PA-DST through a Hugging Face ``Trainer``: a tiny GPT-2 built from a config, no download."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from padst_compiler.integrations.huggingface import PADSTCallback
from padst_compiler.training import Block, PADSTLinear, padst_layers, sparsify

STEPS = 12


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def trainer_for(out, permutation="learned", save_steps=100, callback=None, model=None, **arguments):
    args = TrainingArguments(out, max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-3,
                             logging_steps=2, save_steps=save_steps, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, **arguments)
    callback = callback or PADSTCallback(Block(4, 4), 0.75, sparsify_options={"permutation": permutation},
                                         scheduler_options={"update_every": 3, "harden_at": 0.3})
    return Trainer(model=model or tiny_gpt2(), args=args, train_dataset=Tokens(), callbacks=[callback])


def tensors(model):
    return {key: value for key, value in model.state_dict().items() if torch.is_tensor(value)}


@pytest.mark.parametrize("permutation", ["learned", "birkhoff"])
@pytest.mark.parametrize("resume_at", [2, 5], ids=["while-warming-up", "after-hardening"])
def test_resumed_trainer_run_ends_equal_to_an_uninterrupted_one(tmp_path, permutation, resume_at):
    uninterrupted = trainer_for(tmp_path / "full", permutation)
    uninterrupted.train()
    assert all(not layer.soft for _, layer in padst_layers(uninterrupted.model))

    trainer_for(tmp_path / "part", permutation, save_steps=resume_at).train()
    resumed = trainer_for(tmp_path / "part", permutation)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / f"checkpoint-{resume_at}"))
    torch.testing.assert_close(tensors(resumed.model), tensors(uninterrupted.model), rtol=0, atol=0)


def test_trainer_logs_the_schedule(tmp_path):
    trainer = trainer_for(tmp_path, "birkhoff")
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "padst/density" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6, 8, 10, 12, 12]  # and the closing summary
    assert logged[0]["padst/soft_layers"] == 8 and logged[0]["padst/penalty"] > 0
    assert logged[-1]["padst/soft_layers"] == 0 and logged[-1]["padst/density"] == pytest.approx(0.25)


def test_callback_state_survives_the_trainers_own_callback_restore(tmp_path):
    trainer_for(tmp_path, save_steps=5).train()
    resumed = trainer_for(tmp_path, restore_callback_states_from_checkpoint=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    restored = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, PADSTCallback)]
    assert len(restored) == 1 and restored[0].scheduler.step_count == STEPS
    assert restored[0].structure == Block(4, 4)


def test_a_model_sparsified_beforehand_trains_with_a_bare_callback(tmp_path):
    model = sparsify(tiny_gpt2(), Block(4, 4), 0.75, permutation="random")
    trainer = trainer_for(tmp_path, callback=PADSTCallback(), model=model)
    trainer.train()
    assert trainer.state.log_history[-1]["padst/density"] == pytest.approx(0.25)


def test_a_bare_callback_on_a_dense_model_is_refused_before_any_step(tmp_path):
    trainer = trainer_for(tmp_path, callback=PADSTCallback(), model=tiny_gpt2())
    with pytest.raises(ValueError, match="no PA-DST layer.*Trainer\\(callbacks="):
        trainer.train()
    assert not any(isinstance(module, PADSTLinear) for module in trainer.model.modules())


def test_resuming_without_saved_scheduler_state_is_refused(tmp_path):
    trainer_for(tmp_path, save_steps=5).train()
    state_file = tmp_path / "checkpoint-5" / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"PADSTCallback"', '"Other"'))
    with pytest.raises(ValueError, match="resuming at step 5.*no PA-DST scheduler state"):
        trainer_for(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))


@pytest.mark.parametrize("arguments, message", [
    ({"structure": Block(4, 4)}, "structure and sparsity together"),
    ({"structure": "block4", "sparsity": 0.5}, "must be a Structure"),
    ({"structure": Block(4, 4), "sparsity": 0.5, "scheduler_options": {"total_steps": 3}}, "max_steps"),
])
def test_bad_callback_options_are_refused_at_once(arguments, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PADSTCallback(**arguments)
