"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880): M residual streams per token.

The residual state is ``x_l in R^{M x D}`` per token (``[B, T, M, D]`` for a batch). Around a sublayer F::

    x~      = RMSNorm(vec(x_l))                                   (1 x MD, no gain: phi absorbs it)
    H_pre   = sigmoid(alpha_pre  * x~ phi_pre  + b_pre)           (1 x M,  read-in weights, >= 0)
    H_post  = 2 sigmoid(alpha_post * x~ phi_post + b_post)        (1 x M,  write-out weights, in (0, 2))
    H_res   = Sinkhorn-Knopp(alpha_res * mat(x~ phi_res) + b_res) (M x M,  doubly stochastic)
    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

Every coefficient has a static part (the bias b) and a token-dependent part scaled by a learnable scalar alpha
(initialised small). Because H_res is doubly stochastic its spectral norm is 1 and products of H_res across
layers stay doubly stochastic, so the stream mixing can neither blow up nor vanish with depth -- the manifold
constraint that makes hyper-connections trainable at scale. The coefficients are computed in float32.

A block calls ``h_in, ctx = hc.pre(x)``, runs its sublayer ``out = F(h_in)`` and then ``x = hc.post(x, out, ctx)``.
:class:`PlainResidual` has the same API for M = 1 (``x + F(x)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

ALPHA_INIT = 0.01  # initial scale of the token-dependent parts: start near the static mixing
# Initial diagonal of H_res (off-diagonal (1 - d) / (M - 1)): identity-leaning but not extreme. Sinkhorn converges
# at a rate set by how far from identity the matrix is: with 20 iterations rows sum to 1 within ~1e-6 from d = 0.8,
# but only within ~1e-4 from d = 0.95.
RES_INIT_DIAG = 0.8


def sinkhorn_knopp(logits: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """Project ``[..., M, M]`` logits onto (approximately) doubly stochastic matrices.

    ``P = exp(logits)``, then ``iters`` rounds of "divide each row by its sum, then each column by its sum".
    Columns sum to 1 after the last round; rows converge to 1 geometrically, slower the closer P is to a
    permutation (about 1e-6 after 20 rounds at this module's initial logits; a finite number of rounds is only
    approximately doubly stochastic). The max logit is subtracted first (a common factor: result unchanged).
    """
    if iters < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least 1 iteration, got {iters}")
    p = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        p = p / (p.sum(dim=-1, keepdim=True) + eps)
        p = p / (p.sum(dim=-2, keepdim=True) + eps)
    return p


def expand_streams(h: torch.Tensor, m: int) -> torch.Tensor:
    """Embedding output ``[B, T, D]`` -> the initial residual state ``[B, T, M, D]``: every stream a copy of h.

    Returned as a broadcast view (no copy); do not modify it in place.
    """
    return h.unsqueeze(-2).expand(*h.shape[:-1], m, h.shape[-1])


def reduce_streams(x: torch.Tensor) -> torch.Tensor:
    """Final residual state ``[B, T, M, D]`` -> ``[B, T, D]`` by the **mean** over streams.

    Mean, not sum: at initialisation all streams are equal (expand copies h, H_post = 1 writes each output to
    every stream, and a doubly stochastic H_res maps equal streams to themselves), so the mean is exactly the
    single-stream residual ``h + sum_l F_l`` and M = 1 and M > 1 models start at the same scale. A sum would
    multiply the final hidden state by M.
    """
    return x.mean(dim=-2)


def _check_state(x: torch.Tensor, m: int, hidden: int) -> None:
    if x.dim() < 3 or tuple(x.shape[-2:]) != (m, hidden):
        raise ValueError(
            f"residual state must be [B, T, M={m}, D={hidden}], got {tuple(x.shape)}; "
            "use expand_streams(h, M) to turn a [B, T, D] hidden state into one"
        )


class HyperConnection(nn.Module):
    """The mHC read-in / write-out around one sublayer (attention or FFN) for M >= 2 streams.

    Parameters (names as in the paper): ``phi_pre [MD, M]``, ``phi_post [MD, M]``, ``phi_res [MD, M*M]``,
    scalars ``alpha_pre / alpha_post / alpha_res`` and biases ``b_pre [M]``, ``b_post [M]``, ``b_res [M, M]``.
    Initialisation makes the block start close to a standard residual: ``H_pre = 1/M`` (mean read-in),
    ``H_post = 1``, ``H_res`` = identity-leaning (diagonal 0.8), token-dependent parts scaled by alpha = 0.01.
    ``eps`` is the RMSNorm epsilon (also guards the Sinkhorn divisions).
    """

    def __init__(self, hidden: int, m: int, sinkhorn_iters: int = 20, eps: float = 1e-6):
        super().__init__()
        if m < 2:
            raise ValueError(f"HyperConnection needs M >= 2 streams, got {m}; use PlainResidual for M = 1")
        if hidden <= 0 or sinkhorn_iters < 1:
            raise ValueError(f"need hidden > 0 and sinkhorn_iters >= 1, got {hidden}, {sinkhorn_iters}")
        self.hidden, self.m, self.sinkhorn_iters, self.eps = hidden, m, sinkhorn_iters, eps
        self.phi_pre = nn.Parameter(torch.empty(m * hidden, m))
        self.phi_post = nn.Parameter(torch.empty(m * hidden, m))
        self.phi_res = nn.Parameter(torch.empty(m * hidden, m * m))
        self.alpha_pre = nn.Parameter(torch.empty(()))
        self.alpha_post = nn.Parameter(torch.empty(()))
        self.alpha_res = nn.Parameter(torch.empty(()))
        self.b_pre = nn.Parameter(torch.empty(m))
        self.b_post = nn.Parameter(torch.empty(m))
        self.b_res = nn.Parameter(torch.empty(m, m))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        m = self.m
        with torch.no_grad():
            # x~ has unit RMS, so x~ phi has ~unit-variance entries and alpha alone sets the dynamic scale.
            for phi in (self.phi_pre, self.phi_post, self.phi_res):
                nn.init.normal_(phi, std=1.0 / math.sqrt(m * self.hidden))
            for alpha in (self.alpha_pre, self.alpha_post, self.alpha_res):
                alpha.fill_(ALPHA_INIT)
            self.b_pre.fill_(-math.log(m - 1))  # sigmoid(-log(M-1)) = 1/M: read-in is the mean of the streams
            self.b_post.zero_()  # 2 sigmoid(0) = 1: the output is added to every stream
            # exp(b_res) with diagonal c and off-diagonal 0 is already doubly stochastic after scaling, with
            # diagonal e^c / (e^c + M - 1) = RES_INIT_DIAG.
            c = math.log(RES_INIT_DIAG * (m - 1) / (1.0 - RES_INIT_DIAG))
            self.b_res.copy_(torch.eye(m, device=self.b_res.device) * c)

    def mixing_matrices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, M, D] -> (H_pre [B, T, M], H_post [B, T, M], H_res [B, T, M, M]), all float32."""
        _check_state(x, self.m, self.hidden)
        m = self.m
        x_tilde = F.rms_norm(x.float().flatten(-2), (m * self.hidden,), eps=self.eps)  # [B, T, MD]
        phi = torch.cat((self.phi_pre, self.phi_post, self.phi_res), dim=1).float()  # one GEMM
        d_pre, d_post, d_res = (x_tilde @ phi).split([m, m, m * m], dim=-1)
        h_pre = torch.sigmoid(self.alpha_pre.float() * d_pre + self.b_pre.float())
        h_post = 2.0 * torch.sigmoid(self.alpha_post.float() * d_post + self.b_post.float())
        res_logits = self.alpha_res.float() * d_res.unflatten(-1, (m, m)) + self.b_res.float()
        h_res = sinkhorn_knopp(res_logits, self.sinkhorn_iters, self.eps)
        return h_pre, h_post, h_res

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Read-in ``h_in = H_pre x`` ([B, T, D]); ctx carries (H_post, H_res) for :meth:`post`."""
        h_pre, h_post, h_res = self.mixing_matrices(x)
        h_in = torch.einsum("...m,...md->...d", h_pre.to(x.dtype), x)
        return h_in, (h_post, h_res)

    def post(self, x: torch.Tensor, out: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Write-out ``x_{l+1} = H_res x + H_post^T out``: x [B, T, M, D], out [B, T, D] -> [B, T, M, D]."""
        if out.shape != x.shape[:-2] + x.shape[-1:]:
            raise ValueError(f"sublayer output must be {tuple(x.shape[:-2] + x.shape[-1:])}, got {tuple(out.shape)}")
        h_post, h_res = ctx
        mixed = torch.einsum("...ij,...jd->...id", h_res.to(x.dtype), x)
        return mixed + h_post.to(x.dtype).unsqueeze(-1) * out.unsqueeze(-2)


class PlainResidual(nn.Module):
    """The standard residual ``x + F(x)`` with the :class:`HyperConnection` API, on a ``[B, T, 1, D]`` state."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def mixing_matrices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The trivial coefficients: H_pre = H_post = [1], H_res = [[1]]."""
        _check_state(x, 1, self.hidden)
        ones = x.new_ones(x.shape[:-2] + (1,), dtype=torch.float32)
        return ones, ones, ones.unsqueeze(-1)

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        _check_state(x, 1, self.hidden)
        return x.squeeze(-2), None

    def post(self, x: torch.Tensor, out: torch.Tensor, ctx: None = None) -> torch.Tensor:
        if out.shape != x.shape[:-2] + x.shape[-1:]:
            raise ValueError(f"sublayer output must be {tuple(x.shape[:-2] + x.shape[-1:])}, got {tuple(out.shape)}")
        return x + out.unsqueeze(-2)


def build_residual(cfg: ModelConfig) -> nn.Module:
    """One sublayer's residual connection: :class:`PlainResidual` for ``cfg.hc_mult == 1``, else mHC."""
    if cfg.hc_mult == 1:
        return PlainResidual(cfg.hidden_size)
    return HyperConnection(cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.norm_eps)
