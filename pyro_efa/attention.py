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

None of these let ``z_i`` depend on ``x_i``, nor (``uni``) on any later ``x_j``. Every mode reads
which positions a target may use from one rule, :func:`context_mask`.

**Empty contexts.** In the bidirectional model a target whose context is empty (the only
observation of its unit) gets ``z_i = 0``, so its natural parameter is its key's intercept: with
nothing to condition on it predicts the key's marginal. In the causal model the first observation
of a unit keeps the state of its query token (key and position): that models the distribution of
first observations, which may differ from later ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import EFAConfig
from .errors import InputError

__all__ = ["AttentionBlock", "EFAEncoder", "context_mask"]


def context_mask(mask: torch.Tensor, direction: str) -> torch.Tensor:
    """``(B, n, n)`` boolean: True where position ``j`` is in the context ``c_i`` of target ``i``
    (and is not padding). The one rule of which positions a target may use.

    ``uni``: ``j < i``; ``bi``: ``j != i``.
    """
    n = mask.size(-1)
    idx = torch.arange(n, device=mask.device)
    if direction == "uni":
        rel = idx[None, :] < idx[:, None]
    elif direction == "bi":
        rel = idx[None, :] != idx[:, None]
    else:
        raise InputError(f"direction must be 'uni' or 'bi', got {direction!r}")
    return rel & mask[..., None, :]


class AttentionBlock(nn.Module):
    r"""Multi-head attention, residual add, optional LayerNorm and feed-forward block.

    .. math::

        a_i = W_O \sum_j \mathrm{softmax}_j\Big(\frac{(W_Q x_i)\cdot(W_K m_j)}{\sqrt{d_h}}\Big) W_V m_j,
        \qquad y_i = x_i + a_i

    for queries ``x`` and memory ``m``, one softmax per head over the allowed ``j``. The fields of
    ``config`` it reads: ``dim``, ``num_heads``, ``head_dim`` (``d_h``), ``layer_norm`` (after the
    attention add and after the feed-forward add), ``ff_dim`` (hidden width of the feed-forward
    block, 0 for none), ``attention`` (``"uniform"`` forces ``W_Q = 0``), ``project`` (``W_V``,
    ``W_O``; without them the value is the memory token itself), ``residual``, ``pool``
    (``"mean"``: softmax weights; ``"sum"``: weights times the number of allowed positions) and
    ``dropout`` (on the attention output and the feed-forward block).

    :param EFAConfig config: the model configuration.
    """

    def __init__(self, config: EFAConfig) -> None:
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim if config.project else dim
        self.uniform = config.attention == "uniform"
        self.project = config.project
        self.residual = config.residual
        self.pool = config.pool
        inner = self.num_heads * self.head_dim
        if not self.uniform:
            self.w_q = nn.Linear(dim, inner, bias=False)
            self.w_k = nn.Linear(dim, inner, bias=False)
        if self.project:
            self.w_v = nn.Linear(dim, inner, bias=False)
            self.w_o = nn.Linear(inner, dim, bias=False)
        ff_dim = config.ff_dim
        self.norm1 = nn.LayerNorm(dim) if config.layer_norm else None
        self.norm2 = nn.LayerNorm(dim) if config.layer_norm and ff_dim else None
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim)) if ff_dim else None
        self.dropout = nn.Dropout(config.dropout)

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


class EFAEncoder(nn.Module):
    """A stack of ``config.num_layers`` :class:`AttentionBlock` computing the target states ``z``
    of a unit.

    The fields of ``config`` it reads besides the blocks': ``direction``, ``context_stream``
    (``"shared"``: context tokens attend to each other, as in the paper; ``"fixed"``: they are
    not updated), ``attend_self`` (the query token attends to itself besides the context) and
    ``encoding`` (the default mode of :meth:`forward`).

    :param EFAConfig config: the model configuration.
    :param int chunk_size: per-target mode processes at most this many target sequences at once.
    """

    def __init__(self, config: EFAConfig, chunk_size: int = 4096) -> None:
        super().__init__()
        self.direction = config.direction
        self.context_stream = config.context_stream
        self.attend_self = config.attend_self
        self.one_pass_exact = config.one_pass_exact
        self.default_mode = "per_target" if config.per_target else "one_pass"
        self.chunk_size = chunk_size
        self.blocks = nn.ModuleList(AttentionBlock(config) for _ in range(config.num_layers))

    def _mode(self, mode: str | None) -> str:
        if mode is None:
            return self.default_mode
        if mode == "auto":
            return "one_pass" if self.one_pass_exact else "per_target"
        if mode not in ("one_pass", "per_target"):
            raise InputError(f"mode must be 'auto', 'one_pass' or 'per_target', got {mode!r}")
        if mode == "one_pass" and not self.one_pass_exact:
            raise InputError(
                "one-pass encoding is exact only for uni, context_stream='fixed', or one layer; "
                "use mode='per_target' for a deeper bidirectional model with a shared context stream"
            )
        return mode

    def forward(
        self,
        content: torch.Tensor,
        query: torch.Tensor,
        mask: torch.Tensor,
        mode: str | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Target states ``z (B, n, d)``.

        :param ~torch.Tensor content: ``(B, n, d)`` content tokens (key + value).
        :param ~torch.Tensor query: ``(B, n, d)`` query tokens (key + mask vector).
        :param ~torch.Tensor mask: ``(B, n)`` True for real observations.
        :param str mode: ``"one_pass"``, ``"per_target"``, ``"auto"`` (one pass when exact) or
            None (the configuration's ``encoding``).
        :param ~torch.Tensor select: ``(B, n)`` targets to compute in per-target mode (default:
            all real observations); other rows of the result are 0.
        """
        ctx = context_mask(mask, self.direction)
        if self._mode(mode) == "one_pass":
            z = self._one_pass(content, query, mask, ctx)
        else:
            z = self._per_target(content, query, mask, ctx, mask if select is None else select & mask)
        if self.direction == "bi":  # no context, no information: the key's intercept
            z = z.masked_fill(~ctx.any(-1, keepdim=True), 0.0)
        return z

    # ------------------------------------------------------------------------------------------
    # the allowed positions, all derived from context_mask
    def _query_allowed(self, ctx: torch.Tensor) -> torch.Tensor:
        # (B, n, 2n): query i attends to content j in c_i, and (attend_self) to its own query token
        n = ctx.size(-1)
        own = torch.eye(n, dtype=torch.bool, device=ctx.device) & self.attend_self
        return torch.cat([ctx, own.expand_as(ctx)], dim=-1)

    def _content_allowed(self, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # (B, n, n): a content token attends to its own context and itself (the shared stream)
        eye = torch.eye(ctx.size(-1), dtype=torch.bool, device=ctx.device)
        return (ctx | eye) & mask[..., None, :]

    def _one_pass(
        self, content: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor
    ) -> torch.Tensor:
        return self._one_pass_layers(content, query, mask, ctx)[-1][1]

    def _one_pass_layers(
        self, content: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # per layer: (memory of the query stream in this layer, query states after it); the content
        # stream of a shared model is updated only where it is read again (uni: exact at any depth;
        # bi one pass is exact only with one layer or the fixed stream, where it is never updated)
        allowed_q = self._query_allowed(ctx)
        allowed_c = self._content_allowed(ctx, mask)
        h, g, out = content, query, []
        for layer, block in enumerate(self.blocks):
            memory = torch.cat([h, g], dim=-2)
            g = block(g, memory, allowed_q)
            if self.context_stream == "shared" and layer + 1 < len(self.blocks):
                h = block(h, h, allowed_c)
            out.append((memory, g))
        return out

    def _per_target(
        self,
        content: torch.Tensor,
        query: torch.Tensor,
        mask: torch.Tensor,
        ctx: torch.Tensor,
        select: torch.Tensor,
    ) -> torch.Tensor:
        out = query.new_zeros(query.shape)
        for b, i in self._chunks(select):
            p, is_query, tokens, allowed = self._per_target_inputs(content, query, mask, ctx, b, i)
            out[b, i] = self._per_target_layers(tokens, is_query, allowed, p, i)[1]
        return out

    def _chunks(self, select: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b_all, i_all = torch.nonzero(select, as_tuple=True)
        for start in range(0, b_all.numel(), self.chunk_size):
            yield b_all[start : start + self.chunk_size], i_all[start : start + self.chunk_size]

    def _per_target_layers(
        self,
        tokens: torch.Tensor,
        is_query: torch.Tensor,
        allowed: torch.Tensor,
        p: torch.Tensor,
        i: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        # the states (P, n, d) of every per-target sequence entering each block (a fixed stream
        # keeps the content tokens as they came in), and the query state z (P, d) of each target
        # after the last block, which computes that row only (the others are never read)
        x, inputs = tokens, []
        for block in self.blocks[:-1]:
            inputs.append(x)
            y = block(x, x, allowed)
            x = torch.where(is_query[..., None], y, tokens) if self.context_stream == "fixed" else y
        inputs.append(x)
        z = self.blocks[-1](x[p, i].unsqueeze(-2), x, allowed[p, i].unsqueeze(-2))
        return inputs, z.squeeze(-2)

    def _per_target_inputs(
        self,
        content: torch.Tensor,
        query: torch.Tensor,
        mask: torch.Tensor,
        ctx: torch.Tensor,
        b: torch.Tensor,
        i: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # one sequence per target (b, i): the unit's content tokens with token i replaced by its
        # query token; returns the row index p, the query flags and tokens (P, n[, d]) and the
        # attention mask (P, n, n): content tokens attend to their own context and themselves,
        # the query row to c_i and (attend_self) itself
        p = torch.arange(b.numel(), device=b.device)
        n = ctx.size(-1)
        is_query = torch.zeros(b.numel(), n, dtype=torch.bool, device=b.device)
        is_query[p, i] = True
        tokens = torch.where(is_query[..., None], query[b], content[b])
        allowed = self._content_allowed(ctx[b], mask[b])
        allowed[p, i] = ctx[b, i]
        allowed[p, i, i] = self.attend_self
        return p, is_query, tokens, allowed

    @torch.no_grad()
    def attention_weights(
        self, content: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, mode: str | None = None
    ) -> list[torch.Tensor]:
        """Attention weights of the query stream in every layer, for attention maps.

        ``one_pass``: one tensor ``(B, heads, n, 2n)`` per layer; row ``i`` holds the weights of
        target ``i`` over the content states ``0..n-1`` (columns ``:n``; nonzero only on its
        context ``c_i``) and over the query tokens (columns ``n:``; nonzero only on its own query
        token ``n + i``).

        ``per_target``: one tensor ``(B, heads, n, n)`` per layer; row ``i`` holds the weights
        of target ``i``'s query token in its own sequence, column ``i`` being its own token.

        Rows of padding positions and of targets with nothing to attend to are 0; all others sum
        to 1 (softmax weights, also with ``pool="sum"``, which rescales the output, not the
        weights).

        :param ~torch.Tensor content: ``(B, n, d)`` content tokens.
        :param ~torch.Tensor query: ``(B, n, d)`` query tokens.
        :param ~torch.Tensor mask: ``(B, n)`` True for real observations.
        :param str mode: as in :meth:`forward`.
        :rtype: list[~torch.Tensor]
        """
        ctx = context_mask(mask, self.direction)
        if self._mode(mode) == "one_pass":
            allowed_q = self._query_allowed(ctx)
            out, g = [], query
            layers = self._one_pass_layers(content, query, mask, ctx)
            for block, (memory, g_next) in zip(self.blocks, layers, strict=True):
                out.append(block.weights(g, memory, allowed_q) * mask[..., None, :, None])
                g = g_next
            return out
        # per target: the sequences of _per_target, keeping row i of each target's sequence
        B, n = mask.shape
        weights = [query.new_zeros(B, block.num_heads, n, n) for block in self.blocks]
        for b, i in self._chunks(mask):
            p, is_query, tokens, allowed = self._per_target_inputs(content, query, mask, ctx, b, i)
            inputs, _ = self._per_target_layers(tokens, is_query, allowed, p, i)
            row = allowed[p, i].unsqueeze(-2)  # the query row of each sequence
            for layer, (block, x) in enumerate(zip(self.blocks, inputs, strict=True)):
                weights[layer][b, :, i] = block.weights(x[p, i].unsqueeze(-2), x, row)[..., 0, :]
        return weights
