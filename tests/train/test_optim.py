import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram import MultiHeadEmbedding
from engram.table import EngramTable
from engram.train.optim import (
    LRSchedule,
    OptimConfig,
    RowWiseAdam,
    build_optimizers,
    clip_grad_norm,
    lr_factor,
    param_groups,
)


class HostTable(EngramTable):
    """Stands in for any other EngramTable whose rows are a parameter (a row shard, say)."""

    def __init__(self):
        super().__init__([13], 4)
        self.rows = nn.Parameter(torch.randn(13, 4))


class Toy(nn.Module):
    def __init__(self, vocab=32, dim=8):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.engram = MultiHeadEmbedding([7, 11], 4)
        self.host_table = HostTable()
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim, bias=False)
        self.norm = nn.RMSNorm(dim)
        self.router = nn.Linear(dim, 4, bias=False)
        self.w1 = nn.Parameter(torch.randn(4, dim, 16) * 0.1)  # an expert bank [E, D, I]
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.tok_emb(ids)
        mem = self.engram(torch.stack([ids % 7, ids % 11], -1)).flatten(-2)
        h = h + mem + self.host_table.rows[ids % 13].sum(-1, keepdim=True)
        h = h + self.mlp(F.silu(self.attn(self.norm(h))))
        gate = self.router(h).softmax(-1)
        h = h + torch.einsum("bte,edi->bti", gate, self.w1).sum(-1, keepdim=True)
        return self.lm_head(h)


def _names(groups, key):
    return {n for n, _ in groups[key]}


def test_param_groups_assign_each_parameter_its_role():
    g = param_groups(Toy())
    assert _names(g, "tables") == {"engram.weight", "host_table.rows"}
    assert _names(g, "matrices") == {"attn.weight", "mlp.weight"}
    assert _names(g, "adamw") == {"tok_emb.weight", "router.weight", "lm_head.weight", "w1"}
    assert _names(g, "no_decay") == {"attn.bias", "norm.weight"}


def test_tied_parameters_are_counted_once():
    m = Toy()
    m.lm_head.weight = m.tok_emb.weight
    g = param_groups(m)
    assert sum(len(v) for v in g.values()) == len(list(m.parameters()))


def _owner(optimizers, param):
    for opt in optimizers:
        for group in opt.param_groups:
            if any(p is param for p in group["params"]):
                return opt, group
    raise AssertionError("parameter not in any optimizer")


def test_tables_get_five_times_the_lr_and_no_weight_decay_and_matrices_get_muon():
    m = Toy()
    cfg = OptimConfig(lr=1e-3)
    opts = build_optimizers(m, cfg)
    opt, group = _owner(opts, m.engram.weight)
    assert group["lr"] == pytest.approx(5e-3) and group["weight_decay"] == 0.0
    assert _owner(opts, m.host_table.rows)[1] is group
    for p in (m.attn.weight, m.mlp.weight):
        assert isinstance(_owner(opts, p)[0], torch.optim.Muon)
    for p in (m.tok_emb.weight, m.router.weight, m.lm_head.weight, m.w1):
        opt, group = _owner(opts, p)
        assert isinstance(opt, torch.optim.AdamW) and group["weight_decay"] == 0.1 and group["lr"] == 1e-3
    assert _owner(opts, m.norm.weight)[1]["weight_decay"] == 0.0
    assert isinstance(
        _owner(build_optimizers(m, OptimConfig(table_optimizer="rowwise")), m.engram.weight)[0], RowWiseAdam
    )


def test_without_muon_matrices_train_with_adamw():
    m = Toy()
    opts = build_optimizers(m, OptimConfig(muon=False))
    assert not any(isinstance(o, torch.optim.Muon) for o in opts)
    opt, group = _owner(opts, m.attn.weight)
    assert isinstance(opt, torch.optim.AdamW) and group["weight_decay"] == 0.1


@pytest.mark.parametrize("table_optimizer", ["adam", "rowwise"])
def test_all_optimizers_together_reduce_a_loss(table_optimizer):
    torch.manual_seed(0)
    m = Toy()
    cfg = OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant", table_optimizer=table_optimizer)
    opts = build_optimizers(m, cfg)
    ids = torch.randint(0, 32, (4, 12))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        for o in opts:
            o.zero_grad()
        loss.backward()
        clip_grad_norm(m.parameters(), cfg.grad_clip)
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_config_validates_and_round_trips_through_a_dict():
    cfg = OptimConfig(schedule="cosine", betas=(0.8, 0.99))
    assert OptimConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="table_optimizer"):
        OptimConfig(table_optimizer="sgd")
    with pytest.raises(ValueError, match="unknown OptimConfig fields"):
        OptimConfig.from_dict({"learning_rate": 1.0})
    assert OptimConfig.paper().lr == 4e-4


# ---------------------------------------------------------------------------------------------------- schedule
def test_step_schedule_warms_up_then_decays_at_80_and_90_percent():
    cfg = OptimConfig(warmup_steps=10, schedule="step")
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == 1.0
    assert f[79] == 1.0 and f[80] == pytest.approx(0.316) and f[89] == pytest.approx(0.316)
    assert f[90] == pytest.approx(0.1) and f[99] == pytest.approx(0.1)


def test_cosine_schedule_ends_at_min_lr_ratio():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.55)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1) and lr_factor(500, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(50, 100, OptimConfig(warmup_steps=0, schedule="constant")) == 1.0


def test_lr_schedule_scales_every_group_and_resumes_from_its_state():
    m = Toy()
    cfg = OptimConfig(lr=1e-3, warmup_steps=4)
    opts = build_optimizers(m, cfg)
    sched = LRSchedule(opts, cfg, total_steps=100)
    table_group = _owner(opts, m.engram.weight)[1]
    assert table_group["lr"] == pytest.approx(5e-3 * 0.25)
    for _ in range(85):
        sched.step()
    assert table_group["lr"] == pytest.approx(5e-3 * 0.316)
    assert _owner(opts, m.attn.weight)[1]["lr"] == pytest.approx(1e-3 * 0.316)
    fresh = build_optimizers(m, cfg)
    resumed = LRSchedule(fresh, cfg, total_steps=100)
    resumed.load_state_dict(sched.state_dict())
    assert _owner(fresh, m.engram.weight)[1]["lr"] == table_group["lr"]


# ---------------------------------------------------------------------------------------------------- row-wise
def test_rowwise_adam_moves_only_looked_up_rows_and_keeps_row_sized_state():
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(50, 6))
    opt = RowWiseAdam([table], lr=0.1)
    before = table.detach().clone()
    ids = torch.tensor([3, 7, 7, 20])
    F.embedding(ids, table).pow(2).sum().backward()
    opt.step()
    moved = (table.detach() != before).any(dim=1)
    assert moved.nonzero().squeeze(1).tolist() == [3, 7, 20]
    state = opt.state[table]
    assert {k: tuple(v.shape) for k, v in state.items()} == {"sq_avg": (50,), "row_step": (50,)}
    assert sum(v.numel() for v in state.values()) == 2 * 50  # Adam would hold 2 * 50 * 6
    assert state["row_step"][[3, 7, 20]].tolist() == [1, 1, 1] and state["row_step"].sum() == 3

    snapshot = {k: v.clone() for k, v in state.items()}
    after_first = table.detach().clone()
    opt.zero_grad()
    F.embedding(torch.tensor([1]), table).sum().backward()
    opt.step()
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[1] = False
    assert torch.equal(table.detach()[untouched], after_first[untouched])
    assert torch.equal(state["sq_avg"][untouched], snapshot["sq_avg"][untouched])


def test_rowwise_adam_sparse_and_dense_gradients_give_the_same_update():
    torch.manual_seed(0)
    init = torch.randn(30, 4)
    ids = torch.tensor([[1, 5, 5], [9, 1, 28]])
    target = torch.randn(2, 3, 4)
    results = []
    for sparse in (False, True):
        table = nn.Parameter(init.clone())
        opt = RowWiseAdam([table], lr=0.05, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(F.embedding(ids, table, sparse=sparse), target).backward()
            opt.step()
        results.append(table.detach())
    torch.testing.assert_close(results[0], results[1])


def test_rowwise_adam_reduces_a_regression_loss():
    torch.manual_seed(0)
    table = nn.Parameter(torch.zeros(20, 8))
    target = torch.randn(20, 8)
    opt = RowWiseAdam([table], lr=0.05)
    first = None
    for _ in range(100):
        ids = torch.randint(0, 20, (16,))
        loss = F.mse_loss(F.embedding(ids, table), target[ids])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.mse_loss(table, target).item() < 0.1 * first


def test_rowwise_adam_rejects_non_table_parameters():
    with pytest.raises(ValueError, match="2-D tables"):
        RowWiseAdam([nn.Parameter(torch.zeros(5))])


def test_clip_grad_norm_covers_sparse_and_dense_gradients():
    table = nn.Parameter(torch.zeros(10, 2))
    dense = nn.Parameter(torch.zeros(3))
    table.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 1, 4]]), torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 4.0]]), (10, 2), check_invariants=True
    )
    dense.grad = torch.tensor([0.0, 12.0, 0.0])
    norm = clip_grad_norm([table, dense], 6.5)
    assert norm.item() == pytest.approx(13.0)
    total = torch.cat([table.grad.to_dense().flatten(), dense.grad]).norm()
    assert total.item() == pytest.approx(6.5, rel=1e-4)
    assert clip_grad_norm([dense], 0).item() == pytest.approx(6.0, rel=1e-4)  # 0: measure only
