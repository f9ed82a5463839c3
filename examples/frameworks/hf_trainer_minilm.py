"""IVON in ``transformers.Trainer`` (vbpc's ``VBTrainer``) on the pretrained MiniLM, optionally with PEFT LoRA.

    python examples/frameworks/hf_trainer_minilm.py                 # head + encoder, ~2 minutes on a 2-core CPU
    python examples/frameworks/hf_trainer_minilm.py --lora          # PEFT LoRA adapters + the SEQ_CLS head
    python examples/frameworks/hf_trainer_minilm.py --tiny [--lora] # what CI runs

The task: which of Shakespeare, the King James Bible and Milton a passage is from
(``vbpc.data.load_corpus_task``).  Without ``--lora`` the model is vbpc's ``minilm_classifier`` (it returns
logits; ``VBTrainer`` computes the cross-entropy against ``labels``); with ``--lora`` it is the HF sequence
classifier wrapped by ``peft.get_peft_model``, and ``scope="lora"`` takes the adapters *and* PEFT's
``modules_to_save`` classifier head.  ``bma_samples`` makes ``trainer.evaluate()`` score the Bayesian
model average (``eval_loss`` is its NLL).
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import vbpc  # noqa: E402
from vbpc.data import load_corpus_task  # noqa: E402
from vbpc.integrations.hf import VBTrainer  # noqa: E402
from vbpc.models import minilm_classifier, minilm_path  # noqa: E402


def build(lora: bool, num_labels: int) -> torch.nn.Module:
    if not lora:
        return minilm_classifier(num_labels)
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels,
                                                                               local_files_only=True)
    return peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                     target_modules=["query", "value"]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="runs/hf_trainer_minilm")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    task = load_corpus_task(max_per_class=12 if args.tiny else 300, seed=0)
    model = build(args.lora, task.num_classes)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)

    def rows(split):
        enc = tok(list(split.texts), padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "labels": split.labels[i]} for i in range(len(split.texts))]

    train, val = rows(task.train), rows(task.val)
    scope = "lora" if args.lora else "all"
    opt = vbpc.IVON(vbpc.select_parameters(model, scope), lr=0.1, ess=1e6, hess_init=5.0, beta2=0.9)
    targs = transformers.TrainingArguments(output_dir=args.out, per_device_train_batch_size=8 if args.tiny else 32,
                                           max_steps=2 if args.tiny else 30, max_grad_norm=0.0, report_to=[],
                                           save_strategy="no", use_cpu=True, disable_tqdm=args.tiny,
                                           logging_steps=10, per_device_eval_batch_size=64)
    trainer = VBTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val, optimizers=(opt, None),
                        bma_samples=2 if args.tiny else 8)
    trainer.train()
    metrics = trainer.evaluate()
    print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return metrics


if __name__ == "__main__":
    main()
