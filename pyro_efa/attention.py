r"""Leak-free self-attention encoders for exponential family attention.

Every observation ``i`` of a unit gets a state ``z_i`` computed from

- the **query token** ``query[i]``: its key embedding plus a learned mask vector (its value is
  hidden), and
- the **content tokens** ``content[j]``: key plus value embeddings of the observations ``j`` in
  its context ``c_i`` (``j < i`` for ``direction="uni"``, ``j != i`` for ``direction="bi"``).

Two ways to compute all states of a unit:

``per_target`` (the paper's computation)
    For each target ``i`` the whole unit is re-encoded with token ``i`` replaced by its query
    token; every token attends to every visible token (causal mask for ``uni``); ``z_i`` is read
    at position ``i``. Cost: ``n`` sequences of length ``n`` per unit.

``one_pass`` (two-stream attention)
    A content stream ``h`` and a query stream ``g`` share the layer weights. The query stream at
    ``i`` attends to content states of ``c_i`` and to itself; the content stream attends
    causally (``uni``) to content only. For ``uni`` this equals ``per_target`` at any depth; for
    ``bi`` it does for one layer (content states are never read after the first layer).

With ``context_stream="fixed"`` content tokens are not updated at all (every layer attends to the
input tokens): a different architecture from the paper's, exact in one pass at any depth in both
directions.

None of these let ``z_i`` depend on ``x_i``, nor (``uni``) on any later ``x_j``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionBlock", "EFAEncoder", "context_mask"]


class AttentionBlock(nn.Module):
    r"""Multi-head attention, residual add, optional LayerNorm and feed-forward block.

    .. math::

        a_i = W_O \sum_j \mathrm{softmax}_j\Big(\frac{(W_Q x_i)\cdot(W_K m_j)}{\sqrt{d_h}}\Big) W_V m_j,
        \qquad y_i = x_i + a_i

    for queries ``x`` and memory ``m``, one softmax per head over the allowed ``j``.

    :param int dim: model width ``d``.
    :param int num_heads: number of heads.
    :param int head_dim: width ``d_h`` of each head.
    :param bool layer_norm: LayerNorm after the attention add (and after the feed-forward add).
    :param int ff_dim: hidden width of the feed-forward block; 0 for none.
    :param bool uniform: force uniform attention over the allowed positions (``W_Q = 0``).
    :param bool project: use ``W_V``, ``W_O``; without them heads must be 1 and the value is the
        memory token itself (``W_V = W_O = I``).
    :param bool residual: add the query token to the attention output.
    :param str pool: ``"mean"`` (softmax weights) or ``"sum"`` (weights times the number of
        allowed positions; with ``uniform`` this is a plain sum over the context).
    :param float dropout: dropout on the attention output and feed-forward block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 2,
        head_dim: int = 16,
        layer_norm: bool = False,
        ff_dim: int = 0,
        uniform: bool = False,
        project: bool = True,
        residual: bool = True,
        pool: str = "mean",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "sum"):
            raise ValueError(f"pool must be 'mean' or 'sum', got {pool!r}")
        if not project and num_heads != 1:
            raise ValueError("project=False needs num_heads=1 (the value is the token itself)")
        self.num_heads = num_heads
        self.head_dim = head_dim if project else dim
        self.uniform = uniform
        self.project = project
        self.residual = residual
        self.pool = pool
        inner = self.num_heads * self.head_dim
        if not uniform:
            self.w_q = nn.Linear(dim, inner, bias=False)
            self.w_k = nn.Linear(dim, inner, bias=False)
        if project:
            self.w_v = nn.Linear(dim, inner, bias=False)
            self.w_o = nn.Linear(inner, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim) if layer_norm else None
        self.norm2 = nn.LayerNorm(dim) if layer_norm and ff_dim else None
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim)) if ff_dim else None
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (..., n, h * d_h) -> (..., h, n, d_h)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-2, -3)

    def _qkv(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self._heads(self.w_v(memory) if self.project else memory)
        if self.uniform:
            # zero queries give equal scores, so the softmax is uniform over allowed positions
            q = x.new_zeros(*x.shape[:-2], self.num_heads, x.size(-2), self.head_dim)
            k = v.new_zeros(v.shape)
        else:
            q, k = self._heads(self.w_q(x)), self._heads(self.w_k(memory))
        return q, k, v

    def attend(self, x: torch.Tensor, memory: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attention output ``a`` for queries ``x (..., n, d)`` over ``memory (..., m, d)``.

        ``allowed (..., n, m)`` is True where query ``i`` may attend to memory ``j``. A query
        with no allowed position gets ``a_i = 0``.
        """
        q, k, v = self._qkv(x, memory)
        mask = allowed.unsqueeze(-3)  # broadcast over heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.pool == "sum":
            out = out * mask.sum(-1, keepdim=True).to(out.dtype)
        out = out.transpose(-2, -3).flatten(-2)
        return self.w_o(out) if self.project else out

    def weights(self, x: torch.Tensor, memory: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(..., heads, n, m)`` (0 where not allowed), for attention maps."""
        q, k, _ = self._qkv(x, memory)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~allowed.unsqueeze(-3), float("-inf"))
        w = torch.softmax(scores, dim=-1)
        return torch.nan_to_num(w, nan=0.0)  # rows with nothing allowed

    def forward(self, x: torch.Tensor, memory: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.attend(x, memory, allowed))
        if self.residual:
            y = x + y
        if self.norm1 is not None:
            y = self.norm1(y)
        if self.ff is not None:
            y = y + self.dropout(self.ff(y))
            if self.norm2 is not None:
                y = self.norm2(y)
        return y


def context_mask(mask: torch.Tensor, direction: str) -> torch.Tensor:
    """``(B, n, n)`` boolean: True where ``j`` is in the context of ``i`` (and is not padding).

    ``uni``: ``j < i``; ``bi``: ``j != i``.
    """
    n = mask.size(-1)
    idx = torch.arange(n, device=mask.device)
    if direction == "uni":
        rel = idx[None, :] < idx[:, None]
    elif direction == "bi":
        rel = idx[None, :] != idx[:, None]
    else:
        raise ValueError(f"direction must be 'uni' or 'bi', got {direction!r}")
    return rel & mask[..., None, :]


class EFAEncoder(nn.Module):
    """A stack of :class:`AttentionBlock` computing the target states ``z`` of a unit.

    :param int dim: model width.
    :param int num_layers: number of blocks.
    :param str direction: ``"uni"`` (causal) or ``"bi"``.
    :param str context_stream: ``"shared"`` (context tokens attend to each other, as in the
        paper) or ``"fixed"`` (context tokens are not updated).
    :param bool attend_self: whether the query token attends to itself (besides the context).
    :param int chunk_size: per-target mode processes at most this many target sequences at once.
    :param block_kwargs: passed to every :class:`AttentionBlock`.
    """

    def __init__(
        self,
        dim: int,
        num_layers: int = 2,
        direction: str = "uni",
        context_stream: str = "shared",
        attend_self: bool = True,
        chunk_size: int = 4096,
        **block_kwargs: object,
    ) -> None:
        super().__init__()
        if direction not in ("uni", "bi"):
            raise ValueError(f"direction must be 'uni' or 'bi', got {direction!r}")
        if context_stream not in ("shared", "fixed"):
            raise ValueError(f"context_stream must be 'shared' or 'fixed', got {context_stream!r}")
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        self.direction = direction
        self.context_stream = context_stream
        self.attend_self = attend_self
        self.chunk_size = chunk_size
        self.blocks = nn.ModuleList(AttentionBlock(dim, **block_kwargs) for _ in range(num_layers))

    @property
    def one_pass_exact(self) -> bool:
        """Whether the one-pass computation equals the per-target one for this configuration."""
        return self.direction == "uni" or self.context_stream == "fixed" or len(self.blocks) == 1

    def forward(
        self,
        content: torch.Tensor,
        query: torch.Tensor,
        mask: torch.Tensor,
        mode: str = "auto",
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Target states ``z (B, n, d)``.

        :param ~torch.Tensor content: ``(B, n, d)`` content tokens (key + value).
        :param ~torch.Tensor query: ``(B, n, d)`` query tokens (key + mask vector).
        :param ~torch.Tensor mask: ``(B, n)`` True for real observations.
        :param str mode: ``"one_pass"``, ``"per_target"`` or ``"auto"`` (one pass when exact).
        :param ~torch.Tensor select: ``(B, n)`` targets to compute in per-target mode (default:
            all real observations); other rows of the result are 0.
        """
        if mode == "auto":
            mode = "one_pass" if self.one_pass_exact else "per_target"
        if mode == "one_pass":
            if not self.one_pass_exact:
                raise ValueError(
                    "one-pass encoding is exact only for uni, context_stream='fixed', or one layer; "
                    "use mode='per_target' for a deeper bidirectional model with a shared context stream"
                )
            return self._one_pass(content, query, mask)
        if mode == "per_target":
            return self._per_target(content, query, mask, mask if select is None else select & mask)
        raise ValueError(f"mode must be 'auto', 'one_pass' or 'per_target', got {mode!r}")

    # ------------------------------------------------------------------------------------------
    def _query_allowed(self, mask: torch.Tensor) -> torch.Tensor:
        # (B, n, 2n): query i attends to content j in c_i, and to its own query token
        n = mask.size(-1)
        ctx = context_mask(mask, self.direction)
        own = torch.eye(n, dtype=torch.bool, device=mask.device)
        if not self.attend_self:
            own = torch.zeros_like(own)
        return torch.cat([ctx, own.expand_as(ctx)], dim=-1)

    def _one_pass(self, content: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        allowed_q = self._query_allowed(mask)
        # content stream of the causal model: j attends to content j' <= j
        allowed_c = context_mask(mask, "uni") | torch.eye(mask.size(-1), dtype=torch.bool, device=mask.device)
        h, g = content, query
        for layer, block in enumerate(self.blocks):
            g_next = block(g, torch.cat([h, g], dim=-2), allowed_q)
            if self.context_stream == "shared" and layer + 1 < len(self.blocks):
                h = block(h, h, allowed_c & mask[..., None, :])
            g = g_next
        return g

    def _per_target(
        self, content: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, select: torch.Tensor
    ) -> torch.Tensor:
        out = query.new_zeros(query.shape)
        b_all, i_all = torch.nonzero(select, as_tuple=True)
        for start in range(0, b_all.numel(), self.chunk_size):
            b, i = b_all[start : start + self.chunk_size], i_all[start : start + self.chunk_size]
            out[b, i] = self._per_target_states(content, query, mask, b, i)
        return out

    def _per_target_states(
        self,
        content: torch.Tensor,
        query: torch.Tensor,
        mask: torch.Tensor,
        b: torch.Tensor,
        i: torch.Tensor,
    ) -> torch.Tensor:
        p, is_query, tokens, allowed = self._per_target_inputs(content, query, mask, b, i)
        x = tokens
        for block in self.blocks:
            y = block(x, x, allowed)
            x = torch.where(is_query[..., None], y, tokens) if self.context_stream == "fixed" else y
        return x[p, i]

    def _per_target_inputs(
        self,
        content: torch.Tensor,
        query: torch.Tensor,
        mask: torch.Tensor,
        b: torch.Tensor,
        i: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # one sequence per target (b, i): the unit's content tokens with token i replaced by
        # its query token; returns the row index p, the query flags and tokens (P, n[, d]) and the
        # attention mask (P, n, n)
        p = torch.arange(b.numel(), device=b.device)
        n = mask.size(-1)
        is_query = torch.zeros(b.numel(), n, dtype=torch.bool, device=b.device)
        is_query[p, i] = True
        tokens = torch.where(is_query[..., None], query[b], content[b])
        valid = mask[b]
        idx = torch.arange(n, device=b.device)
        if self.direction == "uni":
            allowed = (idx[None, :] <= idx[:, None]) & valid[:, None, :]
        else:
            allowed = valid[:, None, :].expand(-1, n, -1).clone()
        # the query row: its context plus (optionally) itself
        allowed[p, i, i] = self.attend_self
        return p, is_query, tokens, allowed

    @torch.no_grad()
    def attention_weights(
        self, content: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, mode: str = "auto"
    ) -> list[torch.Tensor]:
        """Attention weights of the query stream in every layer, for attention maps.

        ``one_pass`` (the mode of :meth:`forward` with ``"auto"`` when it is exact): one tensor
        ``(B, heads, n, 2n)`` per layer; row ``i`` holds the weights of target ``i`` over the
        content states ``0..n-1`` (columns ``:n``; nonzero only on its context ``c_i``) and over
        the query tokens (columns ``n:``; nonzero only on its own query token ``n + i``).

        ``per_target``: one tensor ``(B, heads, n, n)`` per layer; row ``i`` holds the weights
        of target ``i``'s query token in its own sequence, column ``i`` being its own token.

        Rows of padding positions and of targets with nothing to attend to are 0; all others sum
        to 1 (softmax weights, also with ``pool="sum"``, which rescales the output, not the
        weights).

        :param ~torch.Tensor content: ``(B, n, d)`` content tokens.
        :param ~torch.Tensor query: ``(B, n, d)`` query tokens.
        :param ~torch.Tensor mask: ``(B, n)`` True for real observations.
        :param str mode: ``"auto"``, ``"one_pass"`` or ``"per_target"``, as in :meth:`forward`.
        :rtype: list[~torch.Tensor]
        """
        if mode == "auto":
            mode = "one_pass" if self.one_pass_exact else "per_target"
        if mode not in ("one_pass", "per_target"):
            raise ValueError(f"mode must be 'auto', 'one_pass' or 'per_target', got {mode!r}")
        if mode == "one_pass" and not self.one_pass_exact:
            raise ValueError("one-pass encoding is not exact for this configuration; use mode='per_target'")
        out: list[torch.Tensor] = []
        if mode == "one_pass":
            # the loop of _one_pass, reading each block's weights before applying it
            allowed_q = self._query_allowed(mask)
            eye = torch.eye(mask.size(-1), dtype=torch.bool, device=mask.device)
            allowed_c = (context_mask(mask, "uni") | eye) & mask[..., None, :]
            h, g = content, query
            for layer, block in enumerate(self.blocks):
                memory = torch.cat([h, g], dim=-2)
                out.append(block.weights(g, memory, allowed_q) * mask[..., None, :, None])
                g_next = block(g, memory, allowed_q)
                if self.context_stream == "shared" and layer + 1 < len(self.blocks):
                    h = block(h, h, allowed_c)
                g = g_next
            return out
        # per target: the sequences of _per_target_states, keeping row i of each target's sequence
        B, n = mask.shape
        weights = [query.new_zeros(B, block.num_heads, n, n) for block in self.blocks]
        b_all, i_all = torch.nonzero(mask, as_tuple=True)
        for start in range(0, b_all.numel(), self.chunk_size):
            b, i = b_all[start : start + self.chunk_size], i_all[start : start + self.chunk_size]
            p, is_query, tokens, allowed = self._per_target_inputs(content, query, mask, b, i)
            x = tokens
            for layer, block in enumerate(self.blocks):
                w = block.weights(x, x, allowed)  # (P, heads, n, n)
                weights[layer][b, :, i] = w[p, :, i]
                y = block(x, x, allowed)
                x = torch.where(is_query[..., None], y, tokens) if self.context_stream == "fixed" else y
        return weights
