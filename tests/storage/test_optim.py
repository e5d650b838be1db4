"""Row-wise Adam: a step changes only the rows the batch looked up, by exactly the row-wise Adam rule (per-row
step counts for the bias correction), in every tier, with a second moment and a step count per row; training
through an offloaded table works."""

import pytest
import torch

from engram import MultiHeadEmbedding
from engram.storage import TIERS, DiskRowStore, OffloadedEmbedding, SparseRowOptimizer

HEADS, DIM = [13, 17], 5


def make_table(tier, tmp_path, cache_bytes=0, seed=0):
    torch.manual_seed(seed)
    mhe = MultiHeadEmbedding(HEADS, DIM)
    kw = {"path": tmp_path / "t.rows"} if tier == "disk" else {}
    return OffloadedEmbedding.from_multihead(mhe, tier, cache_bytes=cache_bytes, **kw)


def ids_batch(seed, batch=2, seq=4):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (batch, seq), generator=g) for s in HEADS], -1)


def manual_adam(w, v, n, g, lr, beta2, eps, wd=0.0):
    """Row-wise Adam written out in float64 for the touched rows: no first moment, v bias-corrected by the row's
    own step count n."""
    w, v, g = w.double(), v.double(), g.double()
    n = n + 1
    v = beta2 * v + (1 - beta2) * g.square().mean(1)
    v_hat = v / (1 - beta2 ** n.double())
    return (w * (1 - lr * wd) - lr * g / (v_hat.sqrt() + eps).unsqueeze(1)).float(), v.float(), n


@pytest.mark.parametrize("tier", TIERS)
def test_a_step_changes_only_looked_up_rows_by_the_rowwise_adam_rule(tmp_path, tier):
    table = make_table(tier, tmp_path, cache_bytes=4 * DIM * 4)
    lr, beta2, eps = 0.05, 0.9, 1e-8
    opt = SparseRowOptimizer(table, lr=lr, beta2=beta2, eps=eps)
    w = table.store.read_range(0, table.num_rows).clone()
    v, n = torch.zeros(table.num_rows), torch.zeros(table.num_rows)
    for seed in range(3):  # later steps hit rows that already have state
        ids = ids_batch(seed)
        target = torch.randn(2, 4, len(HEADS), DIM, generator=torch.Generator().manual_seed(seed))
        ((table(ids) - target) ** 2).sum().backward()
        rows, grad = table.row_grads()
        opt.step()
        opt.zero_grad()
        expected = w.clone()
        expected[rows], v[rows], n[rows] = manual_adam(w[rows], v[rows], n[rows], grad, lr, beta2, eps)
        now = table.store.read_range(0, table.num_rows)
        untouched = torch.ones(table.num_rows, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(now[untouched], w[untouched])  # untouched rows: bit for bit the same
        torch.testing.assert_close(now, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.row_state[0].read_range(0, table.num_rows), torch.stack([v, n], 1))
        w = now.clone()


def test_weight_decay_follows_the_rule_and_spares_rows_with_a_zero_gradient(tmp_path):
    table = make_table("host", tmp_path)
    lr, beta2, eps, wd = 0.1, 0.99, 1e-6, 0.5
    opt = SparseRowOptimizer(table, lr=lr, beta2=beta2, eps=eps, weight_decay=wd)
    v, n = torch.zeros(table.num_rows), torch.zeros(table.num_rows)
    for seed in range(2):
        w = table.store.read_range(0, table.num_rows).clone()
        ids = ids_batch(seed)
        out = table(ids)
        (out[:, :2].pow(3).sum() + 0 * out[:, 2:].sum()).backward()  # the later positions get zero gradient
        rows, grad = table.row_grads()
        opt.step()
        opt.zero_grad()
        moved = grad.ne(0).any(1)
        assert not moved.all()
        r = rows[moved]
        expected, v[r], n[r] = manual_adam(w[r], v[r], n[r], grad[moved], lr, beta2, eps, wd)
        torch.testing.assert_close(table.store.gather(r), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(table.store.gather(rows[~moved]), w[rows[~moved]])  # looked up, zero grad: kept
    torch.testing.assert_close(opt.row_state[0].read_range(0, table.num_rows), torch.stack([v, n], 1))


def test_the_optimizer_keeps_two_scalars_of_state_per_row_in_the_tables_tier(tmp_path):
    for tier in TIERS:
        table = make_table(tier, tmp_path)
        opt = SparseRowOptimizer(table, lr=0.1)
        state = opt.row_state[0]
        assert state.kind == tier and (state.num_rows, state.dim) == (table.num_rows, 2)
        if tier == "disk":
            assert isinstance(state, DiskRowStore) and state.path.name == "t.rows.rowstate"


def test_a_step_without_gradients_changes_nothing(tmp_path):
    table = make_table("host", tmp_path)
    before = table.store.read_range(0, table.num_rows).clone()
    opt = SparseRowOptimizer(table, lr=0.1)
    opt.step()
    with torch.no_grad():
        table(ids_batch(0))
    opt.step()
    assert torch.equal(table.store.read_range(0, table.num_rows), before)


def test_state_dict_round_trip_resumes_identically(tmp_path):
    a, b = make_table("host", tmp_path), make_table("disk", tmp_path)
    opt_a, opt_b = SparseRowOptimizer(a, lr=0.1), SparseRowOptimizer(b, lr=0.1)
    for table, opt in ((a, opt_a), (b, opt_b)):
        table(ids_batch(0)).sum().backward()
        opt.step()
        opt.zero_grad()
    (tmp_path / "resumed").mkdir()
    resumed = SparseRowOptimizer(b, lr=0.1, state_dir=tmp_path / "resumed")
    resumed.load_state_dict(opt_a.state_dict())
    for table, opt in ((a, opt_a), (b, resumed)):
        table(ids_batch(1)).sum().backward()
        opt.step()
    torch.testing.assert_close(a.store.read_range(0, a.num_rows), b.store.read_range(0, b.num_rows))
    with pytest.raises(ValueError, match="format"):
        SparseRowOptimizer(a, lr=0.1).load_state_dict({**opt_a.state_dict(), "format": 1})


def test_bad_arguments_are_refused(tmp_path):
    table = make_table("host", tmp_path)
    with pytest.raises(ValueError, match="no OffloadedEmbedding"):
        SparseRowOptimizer(torch.nn.Linear(2, 2), lr=0.1)
    with pytest.raises(ValueError, match="beta2"):
        SparseRowOptimizer(table, lr=0.1, beta2=1.0)


def test_training_a_tiny_regression_through_an_offloaded_table_reduces_the_loss(tmp_path):
    """Each (head, id) must learn a fixed target vector through a Linear; the table is on disk behind a cache."""
    torch.manual_seed(0)
    table = OffloadedEmbedding.create(
        HEADS, DIM, tier="disk", path=tmp_path / "train.rows", seed=0, cache_bytes=8 * DIM * 4
    )
    head = torch.nn.Linear(len(HEADS) * DIM, 3)
    targets = torch.randn(sum(HEADS), 3)
    model = torch.nn.ModuleDict({"table": table, "head": head})
    sparse = SparseRowOptimizer(model, lr=0.05)
    dense = torch.optim.Adam(head.parameters(), lr=0.01)

    def loss_of(ids):
        y = head(table(ids).flatten(-2))
        fused = table.fused_ids(ids)
        return ((y - targets[fused].mean(-2)) ** 2).mean()

    with torch.no_grad():
        first = sum(loss_of(ids_batch(1000 + i, 8, 8)).item() for i in range(4))
    for step in range(150):
        loss = loss_of(ids_batch(step, 8, 8))
        loss.backward()
        dense.step()
        sparse.step()
        dense.zero_grad()
        sparse.zero_grad()
    with torch.no_grad():
        last = sum(loss_of(ids_batch(1000 + i, 8, 8)).item() for i in range(4))
    assert last < 0.5 * first
