"""The frozen CLIP text tower as training runs it: every step encodes the class prompts, with
the learned context, forward and backward, so the tower does only the work whose result can
reach the loss. Each saving is exact (tests/test_text.py compares the features with the
plain transformers text tower in fp32; benchmarks/bench_text_tower.py times each one):

- packed prompts: the prompts are concatenated, each cut at its own EOT, so no position past
  an EOT is computed (CLIP's causal mask keeps later positions from reaching an EOT);
  attention gathers each prompt's rows back into a [prompts, longest, ...] block, where a
  mask keeps the keys of shorter prompts inside their own prompt;
- the last layer only for the EOT rows: its keys and values need every row, but its queries,
  attention output, MLP, final LayerNorm and projection only the rows that are pooled;
- no weight gradients: the tower's weights are plain tensors that never require grad, so
  backward computes input gradients only, down to the prompt context;
- prepared once, not per step: the packed frozen embeddings (token + position), the index
  tensors, the mask and, at bf16, the weights cast once (autocast would recast all 38 M text
  weights every step) are rebuilt only when the device, dtype or a weight changes.

Not an nn.Module on purpose: it owns no parameters, so it changes no state_dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TowerOptions:
    """Which savings are on; all are exact. Turned off one at a time by the benchmark."""

    pack: bool = True  # cut each prompt at its own EOT (off: all prompts at the longest length)
    last_layer_eot_only: bool = True
    fused_qkv: bool = True  # one [3W, W] product instead of three [W, W] ones
    prepare_once: bool = True  # off: rebuild indices, mask, embeddings and weights every call
    compile: bool = False  # torch.compile the layers (measured: benchmarks/bench_head_step.py)


@dataclass
class _Layer:
    ln1: tuple[torch.Tensor, torch.Tensor, float]
    qkv: tuple[torch.Tensor, torch.Tensor]  # fused [3W, W], [3W]
    out: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor, float]
    fc1: tuple[torch.Tensor, torch.Tensor]
    fc2: tuple[torch.Tensor, torch.Tensor]
    act: object


@dataclass
class _Prepared:
    key: tuple
    layers: list[_Layer]
    final_ln: tuple[torch.Tensor, torch.Tensor, float]
    projection: torch.Tensor  # [D, W]
    base: torch.Tensor  # [N, W] frozen token + position embeddings of the packed rows
    ctx_rows: torch.Tensor  # [C * n_ctx] packed rows of the context positions
    ctx_positions: torch.Tensor  # [C * n_ctx, W] their position embeddings
    to_block: torch.Tensor  # [C, Lmax] packed row of each (prompt, position); padding repeats EOT
    from_block: torch.Tensor  # [N] row of each packed row in the flattened [C * Lmax] block
    mask: torch.Tensor  # [C, 1, Lmax, Lmax] additive: 0 where a query may attend, -inf elsewhere
    eot_rows: torch.Tensor  # [C] packed row of each prompt's EOT
    eot_mask: torch.Tensor  # [C, 1, 1, Lmax] the EOT query's row of ``mask``


class TextTower:
    """``tower(ctx)`` -> projected, unnormalised text features ``[C, D]`` of the prompts
    ``[SOS] ctx descriptor [EOT]``; gradients reach ``ctx`` only.

    Runs at the autocast dtype when autocast is on for ``ctx``'s device (the weights cast
    once and kept), else at ``ctx``'s dtype.
    """

    def __init__(self, clip_model, prompts, options: TowerOptions = TowerOptions()):
        """``prompts``: the prompt learner, read on every call (``module.to`` replaces its
        buffers): its ``token_embeddings``, ``eot_positions`` and ``n_ctx``."""
        self.clip_model, self.prompts, self.options = clip_model, prompts, options
        self._prepared: _Prepared | None = None
        self._compiled = None

    # ---- preparation ---------------------------------------------------------------------

    def _watched(self) -> list[torch.Tensor]:
        return [*self.clip_model.text_model.parameters(), self.clip_model.text_projection.weight,
                self.prompts.token_embeddings, self.prompts.eot_positions]

    def _key(self, device: torch.device, dtype: torch.dtype) -> tuple:
        # _version counts in-place writes (load_state_dict, copy_): a changed weight re-prepares.
        return (device, dtype, self.options,
                tuple((t.data_ptr(), t._version) for t in self._watched()))

    def prepared(self, device: torch.device, dtype: torch.dtype) -> _Prepared:
        key = self._key(device, dtype)
        if self._prepared is None or self._prepared.key != key or not self.options.prepare_once:
            with torch.no_grad():
                self._prepared = self._prepare(key, device, dtype)
        return self._prepared

    def _prepare(self, key, device, dtype) -> _Prepared:
        text = self.clip_model.text_model
        cast = lambda t: t.detach().to(device, dtype)  # noqa: E731  (a copy only if it must)

        def ln(m):
            return cast(m.weight), cast(m.bias), m.eps

        layers = []
        for layer in text.encoder.layers:
            a = layer.self_attn
            if self.options.fused_qkv:
                qkv = (cast(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                       cast(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])))
            else:
                qkv = ((cast(a.q_proj.weight), cast(a.k_proj.weight), cast(a.v_proj.weight)),
                       (cast(a.q_proj.bias), cast(a.k_proj.bias), cast(a.v_proj.bias)))
            layers.append(_Layer(ln(layer.layer_norm1), qkv, (cast(a.out_proj.weight), cast(a.out_proj.bias)),
                                 ln(layer.layer_norm2), (cast(layer.mlp.fc1.weight), cast(layer.mlp.fc1.bias)),
                                 (cast(layer.mlp.fc2.weight), cast(layer.mlp.fc2.bias)),
                                 layer.mlp.activation_fn))

        eot = self.prompts.eot_positions.to(device)
        n_prompts = len(eot)
        longest = int(eot.max()) + 1
        lengths = (eot + 1) if self.options.pack else torch.full_like(eot, longest)
        offsets = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(longest, device=device)
        inside = position[None, :] < lengths[:, None]  # [C, Lmax]
        block_rows = (offsets[:, None] + torch.minimum(position[None, :], lengths[:, None] - 1))
        from_block = (torch.arange(n_prompts, device=device)[:, None] * longest + position)[inside]
        positions_of_rows = position.expand(n_prompts, -1)[inside]
        embeddings = text.embeddings
        tokens = self.prompts.token_embeddings.to(device)[:, :longest][inside]
        base = cast(tokens + embeddings.position_embedding.weight.to(device)[positions_of_rows])
        ctx_positions = torch.arange(1, 1 + self.prompts.n_ctx, device=device)
        ctx_rows = (offsets[:, None] + ctx_positions).reshape(-1)
        allowed = (position[None, :, None] >= position[None, None, :]) & inside[:, None, :]
        mask = torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill(
            ~allowed, float("-inf"))[:, None]
        eot_rows = offsets + eot
        return _Prepared(
            key=key, layers=layers, final_ln=ln(text.final_layer_norm),
            projection=cast(self.clip_model.text_projection.weight), base=base,
            ctx_rows=ctx_rows,
            ctx_positions=cast(embeddings.position_embedding.weight.to(device)[ctx_positions]
                               ).repeat(n_prompts, 1),
            to_block=block_rows, from_block=from_block, mask=mask, eot_rows=eot_rows,
            eot_mask=mask[torch.arange(n_prompts, device=device), :, eot][:, :, None])

    # ---- forward -------------------------------------------------------------------------

    def __call__(self, ctx: torch.Tensor) -> torch.Tensor:
        device = ctx.device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else ctx.dtype)
        p = self.prepared(device, dtype)
        with torch.autocast(device.type, enabled=False):
            if self.options.compile:
                if self._compiled is None:
                    self._compiled = torch.compile(self._encode, dynamic=False)
                return self._compiled(p, ctx.to(dtype))
            return self._encode(p, ctx.to(dtype))

    def _encode(self, p: _Prepared, ctx: torch.Tensor) -> torch.Tensor:
        x = p.base.index_put((p.ctx_rows,), ctx.reshape(-1, ctx.shape[-1]) + p.ctx_positions)
        last = len(p.layers) - 1
        for i, layer in enumerate(p.layers):
            if i == last and self.options.last_layer_eot_only:
                x = self._eot_layer(x, layer, p)
            else:
                x = self._layer(x, layer, p)
        if not self.options.last_layer_eot_only:
            x = x[p.eot_rows]
        x = F.layer_norm(x, x.shape[-1:], *p.final_ln)
        return x @ p.projection.t()

    def _qkv(self, h: torch.Tensor, layer: _Layer, p: _Prepared) -> tuple[torch.Tensor, ...]:
        """q, k, v as per-prompt blocks ``[C, H, Lmax, W / H]``; fused: one gather for all."""
        if self.options.fused_qkv:
            return self._heads(F.linear(h, *layer.qkv), p, 3)
        (wq, wk, wv), (bq, bk, bv) = layer.qkv
        return tuple(self._heads(F.linear(h, w, b), p, 1)[0]
                     for w, b in ((wq, bq), (wk, bk), (wv, bv)))

    def _heads(self, t: torch.Tensor, p: _Prepared, parts: int) -> torch.Tensor:
        """Packed ``[N, parts * W]`` -> ``[parts, C, H, Lmax, W / H]``."""
        heads = self.clip_model.text_model.config.num_attention_heads
        c, n = p.to_block.shape
        # index_select: its backward is an index_add, cheaper than advanced indexing's
        block = t.index_select(0, p.to_block.reshape(-1))
        return block.view(c, n, parts, heads, -1).permute(2, 0, 3, 1, 4)

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask
        return scores.float().softmax(-1).to(v.dtype) @ v

    def _layer(self, x: torch.Tensor, layer: _Layer, p: _Prepared) -> torch.Tensor:
        h = F.layer_norm(x, x.shape[-1:], *layer.ln1)
        q, k, v = self._qkv(h, layer, p)
        a = self._attend(q, k, v, p.mask)  # [C, H, Lmax, dh]
        a = a.transpose(1, 2).reshape(-1, x.shape[-1]).index_select(0, p.from_block)
        x = x + F.linear(a, *layer.out)
        return x + self._mlp(x, layer)

    def _eot_layer(self, x: torch.Tensor, layer: _Layer, p: _Prepared) -> torch.Tensor:
        """The last layer for the EOT rows only: ``[N, W]`` -> ``[C, W]``."""
        h = F.layer_norm(x, x.shape[-1:], *layer.ln1)
        width = x.shape[-1]
        rows = h.index_select(0, p.eot_rows)
        if self.options.fused_qkv:  # queries of the EOT rows, keys and values of all
            w, b = layer.qkv
            q = F.linear(rows, w[:width], b[:width])
            k, v = self._heads(F.linear(h, w[width:], b[width:]), p, 2)
        else:
            (wq, wk, wv), (bq, bk, bv) = layer.qkv
            q = F.linear(rows, wq, bq)
            k, v = (self._heads(F.linear(h, w, b), p, 1)[0] for w, b in ((wk, bk), (wv, bv)))
        heads = self.clip_model.text_model.config.num_attention_heads
        q = q.view(len(p.eot_rows), 1, heads, -1).transpose(1, 2)  # [C, H, 1, dh]
        a = self._attend(q, k, v, p.eot_mask)
        x = x.index_select(0, p.eot_rows) + F.linear(a.reshape(len(p.eot_rows), -1), *layer.out)
        return x + self._mlp(x, layer)

    @staticmethod
    def _mlp(x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        h = F.layer_norm(x, x.shape[-1:], *layer.ln2)
        return F.linear(layer.act(F.linear(h, *layer.fc1)), *layer.fc2)
