"""On-policy distillation (--on-policy, GKD, Agarwal et al. 2024): a share of each step's rows
answered by the student itself before the step, scored by the teacher. An extension of the
paper's method; train.train_step calls sample_replies when the flag is on."""
import torch

import data
from runkit.distributed import module_of, print0
from runkit.precision import autocast


def first_step(args, total_steps: int) -> int:
    """The first step whose rows the student may answer (--on-policy-start, a share of the run)."""
    sample_from = int(args.on_policy_start * total_steps)
    if args.on_policy_start:
        print0(f"on-policy: steps 1-{sample_from} of {total_steps} on the data set's replies, then the student "
               f"answers a share {args.on_policy:g} of rows itself")
    return sample_from


def sample_replies(kit, micro: list, step: int) -> tuple[list, int]:
    """The step's micro-batches with a share --on-policy λ of their rows answered by the student itself
    (GKD, Agarwal et al. 2024), and how many tokens it sampled. A row's prompt is its conversation up
    to the first reply (data.prompts); its reply is sampled with the adapters active and dropout off,
    at --on-policy-temperature, with the KV cache and no gradient, all the step's rows in one batch;
    the reply's tokens become the row's only targets, scored by the teacher (data.with_replies; the
    row's CE is dropped by ce_mask in train.train_step). Which rows, and what each samples, is keyed by
    (seed, step, example) rather than drawn from a running generator: the same on any number of ranks
    and after a resume, so there is no sampler state to save."""
    args, device = kit.args, kit.d.device
    rows, gens, chosen = [], [], set()  # (micro-batch, row) of every row, its generator, the sampled ones
    for m, b in enumerate(micro):
        for i, example in enumerate(b["example_ids"].tolist()):
            gen = torch.Generator(device).manual_seed(((args.seed * 1_000_003 + step) * 1_000_003 + example) % 2**63)
            rows.append((m, i))
            gens.append(gen)
            if torch.rand((), generator=gen, device=device) < args.on_policy:
                chosen.add((m, i))
    lockstep = args.zero >= 2  # FSDP2 gathers each layer on every rank together: all rows, every new token
    sample = [k for k, row in enumerate(rows) if lockstep or row in chosen]
    replies = {}
    if sample:
        prompts = [data.prompts(b) for b in micro]
        asked = [prompts[rows[k][0]][rows[k][1]] for k in sample]
        distiller = module_of(kit.model)
        room = min(args.on_policy_max_new, distiller.student.config.max_position_embeddings - max(map(len, asked)),
                   args.max_len - min(map(len, asked)))
        stop = kit.tokenizer.stop_token_ids
        distiller.student.eval()
        with autocast(device, args):
            outs = distiller.generate(asked, max_new_tokens=max(1, room), temperature=args.on_policy_temperature,
                                      stop_token_ids=[] if lockstep else stop, generators=[gens[k] for k in sample],
                                      keep_stop=True)
        distiller.student.train()
        for k, out in zip(sample, outs):
            ends = [j for j, t in enumerate(out) if t in stop]
            replies[rows[k]] = out[:ends[0] + 1] if ends else out  # lockstep ran past the stop: cut there
    new = []
    for m, b in enumerate(micro):
        mine = sorted(i for (mm, i) in chosen if mm == m)
        new.append(data.with_replies(b, mine, [replies[m, i] for i in mine], args.max_len, kit.tokenizer.pad_token_id))
    return new, sum(len(replies[row]) for row in chosen)
