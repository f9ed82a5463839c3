"""vbpc.integrations.hf.VBTrainer: IVON inside transformers.Trainer on a tiny char GPT-2 (real text)."""

from __future__ import annotations

import pytest
import torch

import vbpc
from vbpc.data import CharTokenizer, load_corpus
from vbpc.models import char_gpt2

transformers = pytest.importorskip("transformers")


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, block: int):
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i: int) -> dict:
        x = self.ids[i * self.block:(i + 1) * self.block]
        return {"input_ids": x, "labels": x.clone()}


def test_vbtrainer_samples_every_micro_batch(tmp_path):
    from vbpc.integrations.hf import VBTrainer

    text = load_corpus("shakespeare")[:20000]
    tok = CharTokenizer(text)
    ds = Blocks(tok.encode(text), 32)
    torch.manual_seed(0)
    model = char_gpt2(tok.vocab_size, block_size=32, n_layer=1, n_embd=32, n_head=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = vbpc.IVON(model.parameters(), lr=50.0, ess=len(ds) * 32, hess_init=1e-2, clip_radius=1e-3)
    collected = []
    original_step = opt.step

    def spy_step(closure=None):
        collected.append(opt._count)  # samples collected since the last step
        return original_step(closure)

    opt.step = spy_step
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          gradient_accumulation_steps=2, max_grad_norm=0.0, report_to=[],
                                          save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = VBTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
    out = trainer.train()
    assert collected == [2, 2, 2]  # one weight sample per micro-batch, GA = 2
    assert opt.current_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        bad = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                             per_device_train_batch_size=2, save_strategy="no")
        VBTrainer(model=model, args=bad, train_dataset=ds, optimizers=(opt, None)).train()


def test_vbtrainer_runs_ivon_poco_with_anchor_pass_and_refreshes(tmp_path):
    """IVON-PoCo inside Trainer: two passes per micro-batch (GA = 2), refreshes on schedule over
    ``refresh_data``, finite loss, and α > 0 steps really corrected (the anchor statistics used)."""
    from vbpc.integrations.hf import VBTrainer

    text = load_corpus("shakespeare")[:20000]
    tok = CharTokenizer(text)
    ds = Blocks(tok.encode(text), 32)
    torch.manual_seed(0)
    model = char_gpt2(tok.vocab_size, block_size=32, n_layer=1, n_embd=32, n_head=2)
    opt = vbpc.IVONPoCo(model.parameters(), lr=50.0, ess=len(ds) * 32, hess_init=1e-2, clip_radius=1e-3,
                        alpha=0.75, anchor_period=2, megabatch_size=8, track_stats=True)
    refresh_batches = [{"input_ids": torch.stack([ds[i]["input_ids"] for i in range(j, j + 4)]),
                        "labels": torch.stack([ds[i]["labels"] for i in range(j, j + 4)])} for j in (0, 4, 8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                          gradient_accumulation_steps=2, max_grad_norm=0.0, report_to=[],
                                          save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = VBTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None),
                        refresh_data=refresh_batches)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert opt.t == 4 and opt.current_step == 4
    assert opt.anchor.refreshes == 2 and opt.anchor.examples == 8  # at t = 0 and 2, over 8 examples
    assert opt.counters["inner_passes"] == 4 * 2 * 2  # steps x micro-batches x (current + anchor)
    assert opt.last_stats is not None  # the last step was corrected
    bad = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=10, prior=opt.posterior(model))
    with pytest.raises(TypeError, match="ContinualIVON"):
        VBTrainer(model=model, args=args, train_dataset=ds, optimizers=(bad, None)).train()
