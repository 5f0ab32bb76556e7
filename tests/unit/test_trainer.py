"""The Trainer loop's arithmetic: which gradients an optimizer step is made of, how token losses are normalised over
a step, and where the LR schedule ends."""
import copy

import pytest
import torch

import train_full_sft
from model import TinyMindConfig, TinyMindForCausalLM
from model.data.packing import pad_collate
from model.training.runtime import init_runtime
from model.training.schedule import lr_at
from model.training.trainer import SupervisedSteps, Trainer
from tests import TOKENIZER

pytestmark = pytest.mark.usefixtures("one_thread")


def nano_model(seed=0) -> TinyMindForCausalLM:
    torch.manual_seed(seed)
    return TinyMindForCausalLM(TinyMindConfig(vocab_size=6400, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2))


def chat_sample(length: int, targets: int, seed: int) -> dict:
    """A sequence of `length` random tokens whose last `targets` positions are trained on."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 6400, (length,), generator=generator)
    labels = ids.clone()
    labels[:length - targets] = -100
    return {"input_ids": ids, "labels": labels}


def make_trainer(tmp_path, model, accumulation: int, epochs: int = 1):
    args = train_full_sft.parse_args(["--save_dir", str(tmp_path), "--tokenizer_path", TOKENIZER, "--batch_size", "1",
                                      "--accumulation_steps", str(accumulation), "--epochs", str(epochs),
                                      "--learning_rate", "1e-2", "--dtype", "float32", "--device", "cpu",
                                      "--num_threads", "1", "--from_weight", "none", "--log_interval", "1"])
    return Trainer(args, model, init_runtime("cpu", "float32", 0, 1), "test")


def test_every_target_token_of_a_step_weighs_the_same(tmp_path):
    """Two micro-batches with 2 and 60 target tokens: the step's gradient is that of the mean over all 62 tokens
    (HF Trainer's and TRL's num_items_in_batch), not the mean of the two micro-batch means."""
    samples = [chat_sample(12, 2, seed=1), chat_sample(70, 60, seed=2)]
    model = nano_model()
    reference = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, model, accumulation=2)
    steps = SupervisedSteps(trainer, samples, train_full_sft.loss_fn, pad_collate, shuffle=False,
                            token_normalised=True)
    steps.step()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}

    total, count = 0.0, 0
    for sample in samples:
        out = reference(sample["input_ids"][None])
        targets = sample["labels"][1:]
        losses = torch.nn.functional.cross_entropy(out.logits[0, :-1], targets, ignore_index=-100, reduction="sum")
        total, count = total + losses, count + int((targets != -100).sum())
    (total / count).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_leftover_micro_batches_do_not_leak_into_the_next_epoch(tmp_path):
    """3 samples, one per micro-batch, 2 micro-batches per step, 2 epochs: each epoch makes one step and its third
    micro-batch cannot fill another. Each step's gradient must come from its own two micro-batches only."""
    samples = [chat_sample(16, 8, seed=s) for s in range(3)]
    model = nano_model()
    trainer = make_trainer(tmp_path, model, accumulation=2, epochs=2)
    seen, steps_seen = [], []

    def loss_fn(model, batch):
        seen.append(batch)
        return train_full_sft.loss_fn(model, batch)

    real_step = trainer.engine.step

    def step_and_capture(lr, loss_sum, step, weights_file):
        steps_seen.append(({n: p.grad.clone() for n, p in model.named_parameters()},
                           copy.deepcopy(model.state_dict()), list(seen)))
        seen.clear()
        return real_step(lr, loss_sum, step, weights_file)

    trainer.engine.step = step_and_capture
    trainer.fit(samples, loss_fn, collate_fn=pad_collate)
    assert len(steps_seen) == 2
    for grads, weights, batches in steps_seen:
        assert len(batches) == 2
        fresh = nano_model()
        fresh.load_state_dict(weights)
        for batch in batches:
            loss, _ = train_full_sft.loss_fn(fresh, batch)
            (loss / 2).backward()
        for name, p in fresh.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_last_step_runs_at_the_floor_of_the_schedule():
    total, peak = 10, 1e-3
    rates = [lr_at(step, total, peak, warmup_steps=2, min_lr_ratio=0.1) for step in range(total)]
    assert rates[:2] == [pytest.approx(peak / 2), pytest.approx(peak)]
    assert rates[2] == pytest.approx(peak) and rates[-1] == pytest.approx(0.1 * peak)
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))
