"""Data parallel and sharded training with PyTorch's own engines, the parts train.py does not
write out: torchrun set-up (setup_distributed, print0, all_reduce_sum), FSDP2 around the trained
module (shard, --zero 2/3), and gathering what DDP, ZeroRedundancyOptimizer or FSDP2 hold on
each rank (trainable_state for checkpoints, full_student for the export).

torchrun sets RANK/WORLD_SIZE; plain `python train.py` is a world of one, and every function here
is then a no-op or the plain single-process version.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        return self.rank == 0


def setup_distributed():
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                            if device.type == "cuda" else None)
    return Dist(rank, local, world, device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def shard(distiller, teacher, zero: int):
    """FSDP2 (--zero 2/3): the student sharded layer by layer across ranks, gathered for each
    layer's forward and backward; at --zero 3 the teacher's layers too. (--zero 0/1: train.py
    wraps the Distiller in DistributedDataParallel itself.)"""
    reshard = zero == 3
    for layer in distiller.student.model.layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(distiller, reshard_after_forward=reshard)
    register_fsdp_forward_method(distiller, "generate")  # on-policy sampling gathers the weights too
    if zero == 3 and teacher is not None:
        # Teacher layers are sharded too; its LM head stays whole for the chunked loss.
        for layer in teacher.model.layers:
            fully_shard(layer)
        fully_shard(teacher, ignored_params={teacher.lm_head.weight, teacher.model.embed_tokens.weight})
    return distiller


def module_of(wrapped):
    return wrapped.module if isinstance(wrapped, DDP) else wrapped


def trainable_state(wrapped, optimizer, d: Dist, zero: int):
    """Full (unsharded) trainable weights and optimizer state, on rank 0 (None elsewhere)."""
    if zero >= 2:  # FSDP2: gather the shards with PyTorch's distributed state-dict API
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=opts)
    else:  # DDP keeps whole copies; ZeRO-1 first gathers its optimizer shards on rank 0
        if zero == 1:
            optimizer.consolidate_state_dict(to=0)
        model_sd = module_of(wrapped).state_dict()
        optim_sd = optimizer.state_dict() if d.master else None
    names = {n for n, p in module_of(wrapped).named_parameters() if p.requires_grad}
    model_sd = {k: v.detach().cpu().clone() for k, v in model_sd.items() if k in names}
    return (model_sd, optim_sd) if d.master else (None, None)


def full_student(wrapped, student, zero: int, d: Dist, skeleton):
    """A plain, unsharded copy of the trained student on rank 0 (None elsewhere). Under FSDP2
    `skeleton()` builds an empty model of the same shape (config and adapters) to receive it."""
    if zero < 2:
        return student if d.master else None
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.master:
        return None
    with torch.device("meta"):  # built without weights, then given empty storage
        plain = skeleton()
    plain.to_empty(device=d.device)
    for name, p in plain.named_parameters():  # each weight in its trained dtype (fp64 in tests), not fp32
        p.data = p.data.to(full["student." + name].dtype)
    if student.config.tie_word_embeddings:  # to_empty gave the head and the embedding a tensor each
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.init_rope(d.device)
    plain.load_state_dict({k.removeprefix("student."): v for k, v in full.items()})
    plain.source_dir = student.source_dir
    return plain


def close_run(lock):
    """The end of a run: the process group closed (torchrun) and the run folder's lock released
    (rank 0 holds it; None elsewhere)."""
    if dist.is_initialized():
        # Rank 0 exports alone while the others wait here: tearing gloo down on one rank while another
        # still works can leave both hung at exit (seen once in 8 two-rank float64 runs on plain C++
        # kernels, where rank 0's export is slowest), so every rank leaves together.
        dist.barrier()
        dist.destroy_process_group()
    if lock is not None:
        lock.release()
