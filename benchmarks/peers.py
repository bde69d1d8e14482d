"""The peer the bench compares against: the Neo step written the way most users write it today.

transformers' LlamaForCausalLM for teacher and student, PEFT LoRA with train.py's rank, alpha,
dropout and targets, AdamW, and the loss on the full (B, T, V) logits upcast to fp32
(F.cross_entropy + F.kl_div: neo.reference_loss). bench.py times it (the hf-peft-neo row);
memory.py runs the same step on fake tensors to predict its memory.
"""
import contextlib

import torch
from runkit import flags
from runkit.precision import choose_dtype


def hf_peft(args, teacher_dir, student_dir, device):
    """The common way: transformers + PEFT LoRA + a full-logits CE + KL loss (fp32 upcast)."""
    from transformers import LlamaForCausalLM
    precision = choose_dtype(args.dtype, device)  # the same choice as ours: bf16 weights + autocast, or fp32
    dtype = precision.frozen
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval().requires_grad_(False)
    student = LlamaForCausalLM.from_pretrained(student_dir, dtype=dtype).to(device)
    return hf_peft_step(args, teacher, student, precision, device)


def hf_peft_step(args, teacher, student, precision, device):
    """PEFT LoRA on the transformers student, AdamW, and the full-logits step (also run on fake
    tensors by memory.py to predict this baseline's memory)."""
    from peft import LoraConfig, get_peft_model
    import neo
    targs = flags.parse(["--method", "neo"])  # the same α, T, targets, lr as ours
    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targs.targets.split(","), task_type="CAUSAL_LM")
    student = get_peft_model(student, config)  # adapters fp32 (PEFT's autocast_adapter_dtype) on a bf16 base
    if args.compile:
        for layer in student.base_model.model.model.layers:
            layer.compile()
        for layer in teacher.model.layers:
            layer.compile()
    compute = (lambda: torch.autocast(device.type, dtype=precision.compute)) if precision.compute else contextlib.nullcontext
    if args.grad_checkpoint:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr, betas=(0.9, 0.999), weight_decay=targs.weight_decay)
    alpha, T = targs.alpha, targs.temperature

    def step(b):
        with torch.no_grad():
            t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
        with compute():
            s_logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
            # F.cross_entropy + F.kl_div on the full logits, upcast to fp32 (neo.reference_loss)
            loss = neo.reference_loss(s_logits, t_logits, b["labels"], alpha=alpha, temperature=T).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, targs.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, params, (teacher, student, optimizer)
