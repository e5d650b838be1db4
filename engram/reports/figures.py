"""Figures and the markdown report of a comparison run: loss curves, gate heatmap, table, generations."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..model.model import EngramLM  # noqa: E402
from ..model.params import format_count  # noqa: E402
from ..train.data import TextTokenizer  # noqa: E402
from ..train.evaluate import gate_trace  # noqa: E402


def plot_loss_curves(runs: dict[str, dict], path: Path) -> Path:
    """Train (thin) and validation (markers) loss against step for each named run."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, r) in enumerate(runs.items()):
        color = f"C{i}"
        h = r["history"]
        ax.plot([x["step"] for x in h], [x["loss"] for x in h], color=color, alpha=0.35, lw=1)
        e = r["evals"]
        ax.plot([x["step"] for x in e], [x["val_loss"] for x in e], "o-", color=color, label=f"{name} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Training (thin) and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_gate_heatmap(model: EngramLM, tok: TextTokenizer, text: str, path: Path, max_tokens: int = 200) -> Path:
    """The paper's gate figure: each token of ``text`` shaded by its Engram gate (one panel per Engram layer).

    For every Engram layer the branch whose gate varies most over the text is shown (the paper notes that not
    every branch is interpretable and shows the most interpretable one). Colours span that branch's range over
    the text (white = lowest alpha, red = highest); spaces inside tokens are dropped and newlines shown as ⏎.
    A text longer than the model's ``max_seq_len`` is traced in consecutive windows of that length (each window
    starts without n-gram history, as a new sequence would).
    """
    ids = tok.encode([text])[0][:max_tokens]
    if not ids:
        raise ValueError("the gate heatmap's sample text encodes to no tokens; pass a non-empty text")
    gates = windowed_gate_trace(model, ids)
    pieces = [tok.decode([i]).replace("\n", "⏎").replace("\t", "→").strip(" ") or "␣" for i in ids]
    layers = sorted(gates)
    cmap = plt.get_cmap("Reds")
    n_lines = 2 + sum(set(p) == {"⏎"} for p in pieces)  # source lines (+ room for wrapped ones)
    panel_in = 0.26 * (n_lines + 3)
    fig = plt.figure(figsize=(12, panel_in * len(layers)))
    renderer = fig.canvas.get_renderer()
    for row, layer in enumerate(layers):
        g = gates[layer]  # [T, M]
        branch = int(g.std(0).argmax())
        vals = g[:, branch]
        lo, hi = float(vals.min()), float(vals.max())
        top_margin = 0.45 / (panel_in * len(layers))  # room for the panel title, in figure fractions
        ax = fig.add_axes((0.01, 1 - (row + 1) / len(layers) + 0.01, 0.9, 1 / len(layers) - 0.01 - top_margin))
        ax.set_axis_off()
        ax_w = ax.get_window_extent(renderer).width
        x, y, line_h, gap = 0.0, 1.0, 1.0 / n_lines, 0.004
        for piece, v in zip(pieces, vals.tolist()):
            if set(piece) == {"⏎"}:  # a line break in the source is a line break in the figure
                x, y = 0.0, y - line_h
                continue
            t = ax.text(x, y, piece, fontsize=8, family="monospace", va="top", transform=ax.transAxes,
                        bbox=dict(boxstyle="square,pad=0.15", fc=cmap(0.9 * (v - lo) / (hi - lo + 1e-9)), ec="none"))
            w = t.get_window_extent(renderer).width / ax_w
            if x + w > 1.0 and x > 0:
                x, y = 0.0, y - line_h
                t.set_position((x, y))
            x += w + gap
        ax.set_title(f"Engram block {layer}, branch {branch}: gate alpha from {lo:.2f} (white) to {hi:.2f} (red)",
                     fontsize=9, loc="left")
        cax = fig.add_axes((0.93, 1 - (row + 1) / len(layers) + 0.05, 0.012, 1 / len(layers) - 0.1 - top_margin))
        fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(lo, hi), cmap=cmap), cax=cax)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def windowed_gate_trace(model: EngramLM, ids: list[int]) -> dict[int, torch.Tensor]:
    """:func:`gate_trace` of any number of tokens: windows of ``max_seq_len``, concatenated -> ``{layer: [T, M]}``."""
    device = next(model.parameters()).device
    window = model.cfg.max_seq_len
    parts = [gate_trace(model, torch.tensor([ids[i:i + window]], device=device)) for i in range(0, len(ids), window)]
    return {layer: torch.cat([p[layer] for p in parts]) for layer in parts[0]}


def comparison_table(rows: list[dict]) -> str:
    cols = ["model", "total", "activated", "engram", "routed_experts", "val_loss", "val_ppl", "val_bpb", "tokens_per_s"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if c in ("total", "activated", "engram"):
                cells.append(format_count(v) if v else "0")
            elif c in ("val_loss", "val_bpb"):
                cells.append(f"{v:.4f}")
            elif c == "val_ppl":
                cells.append(f"{v:.2f}")
            elif c == "tokens_per_s":
                cells.append(f"{v:,.0f}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
