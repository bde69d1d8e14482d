"""How noisy D_S is: the standard error of the sampled-tail divergence (cached_loss.py) over its
draws. Training never needs it; benchmarks/experiment.py reports it beside held-out KL figures and
tests/test_sparse_loss.py checks it against the spread of repeated draws."""
import torch
import torch.nn.functional as F

from cached_loss import TeacherTopK
from neo import IGNORE_INDEX, _targets


@torch.no_grad()
def sampled_tail_se(student_hidden, student_head_weight, teacher: TeacherTopK, labels, *, temperature: float = 1.0,
                    vocab_size: int | None = None, ignore_index: int = IGNORE_INDEX) -> float:
    """The standard error, over the tail draws, of D_S's mean per valid target (the `kl` that
    cached_loss.sparse_neo_loss reports), estimated from the draws themselves.

    Only the tail term of D_S is random: −p_tail · (1/s) Σ_m log q_{j_m}. Its variance per row is
    p_tail² · Var_j(log q_j) / s, estimated by the draws' sample variance; rows are independent, so the
    mean over N rows has variance Σ_rows / N². Held-out sets of a few dozen tokens make this large
    (tests/test_bench.py measures against it); a training step's thousands of tokens make it small.
    """
    if teacher.samples is None or teacher.samples.shape[1] < 2:
        raise ValueError("the cached rows carry fewer than 2 tail draws: D_S's spread cannot be estimated")
    ws = student_head_weight if vocab_size is None else student_head_weight[:vocab_size]
    mask, _ = _targets(labels, ws.shape[0], ignore_index)
    z = F.linear(student_hidden[:, :-1][mask].float(), ws.float()) / temperature          # (N, V)
    log_q_s = torch.log_softmax(z, dim=-1).gather(1, teacher.samples.long())               # (N, s)
    row_var = teacher.tail_logp.float().exp() ** 2 * log_q_s.var(-1) / log_q_s.shape[1]   # (N,)
    return float(row_var.sum().sqrt() / max(1, row_var.shape[0]))
