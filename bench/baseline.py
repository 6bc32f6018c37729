"""The baseline: a transformers Trainer + PEFT LoRA script written the way most users write it.

    .venv/bin/python -m bench.baseline --model DIR --data rows.jsonl --eval eval.jsonl --precision bf16 [--device cuda] --out r.json

Rows are tokenized with the model's tokenizer (EOS appended), padded to each batch's longest row by
DataCollatorForLanguageModeling, and trained with the library's defaults except the settings the
issue fixes (by default LoRA r 8 / alpha 16 on q_proj,v_proj; --method picks another of bench/model.py's
METHODS; lr 3e-4, one epoch, seed). Measuring adds only a
step timer, a real-token counter around the collator, logging every step and no checkpoint saving;
none of them changes what is computed.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from bench.model import METHOD_NAMES, method_settings

BATCH_SIZE = 8  # the Trainer's default per_device_train_batch_size, stated here to document it


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--eval", help="held-out rows for the loss after training (none: no eval)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU mode (scripts/gpu_check.sh)")
    p.add_argument("--max-steps", type=int, default=-1, help="a short probe; -1 trains the whole epoch")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--max-length", type=int, default=256, help="rows are cut to this many tokens")
    p.add_argument("--method", choices=METHOD_NAMES, default="lora-qv-r8", help="bench/model.py METHOD_NAMES")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainerCallback, TrainingArguments)

    from bench.measure import eval_loss

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if tokenizer.pad_token is None:  # what such scripts do for a tokenizer without one (the collator needs it)
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model)
    method, checkpointing = method_settings(a.method)
    if checkpointing and method["type"] == "lora":
        model.enable_input_require_grads()  # what such scripts do: checkpointed layers need an input that requires grad
    if method["type"] == "lora":
        model = get_peft_model(model, LoraConfig(r=method["r"], lora_alpha=method["alpha"], lora_dropout=method["dropout"],
                                                 target_modules=method["target_modules"], task_type="CAUSAL_LM"))
    data = load_dataset("json", data_files=a.data, split="train")
    data = data.map(lambda r: tokenizer(r["text"] + tokenizer.eos_token, truncation=True, max_length=a.max_length),
                    remove_columns=["text"])

    tokens_per_step: list[int] = []
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def counting_collator(features):
        batch = collator(features)
        tokens_per_step.append(int(batch["attention_mask"].sum()))
        return batch

    step_ends: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not step_ends:
                step_ends.append(time.perf_counter())  # start of the first step

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(Path(a.out).parent / "baseline-trainer"),
        per_device_train_batch_size=a.batch_size,
        learning_rate=3e-4,
        num_train_epochs=1,
        max_steps=a.max_steps,
        bf16=a.precision == "bf16",
        gradient_checkpointing=checkpointing,
        use_cpu=a.device == "cpu",  # the Trainer refuses bf16 without a GPU unless told it is on the CPU
        seed=a.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=counting_collator,
                      callbacks=[Timer()])
    trainer.train()
    # This process's own peak (Linux's VmHWM): ru_maxrss carries a parent's peak across exec.
    status = Path("/proc/self/status")
    hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.exists() else []
    peak_rss_mb = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    final = None
    if a.eval:
        rows = [json.loads(line) for line in Path(a.eval).read_text().splitlines()]
        ids = [tokenizer(r["text"] + tokenizer.eos_token)["input_ids"] for r in rows]
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            final = eval_loss(model, ids)
    durations = [t1 - t0 for t0, t1 in zip(step_ends, step_ends[1:])]
    Path(a.out).write_text(json.dumps({
        "name": f"transformers Trainer + PEFT ({a.precision}, padded)",
        "precision": a.precision,
        "step_seconds": durations,
        "step_tokens": tokens_per_step[: len(durations)],
        "step_losses": losses,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if a.device == "cuda" else None,
        "eval_loss": final,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
