"""The Tiny Recursive Model for language: flat transformer, dense TRM and TRM + MoEUT.

One small stack of blocks (``L_level``) is applied many times to refine two latent states:

    repeat H_cycles:                     # all but the last cycle run without gradient
        repeat L_cycles: z_L = L_level(z_L, z_H + x)
        z_H = L_level(z_H, z_L)
    logits = lm_head(z_H)                # rms_norm first for flat / MoEUT, not for dense TRM

An ACT wrapper runs this inner forward up to ``halt_max_steps`` times per sequence, carrying the
(detached) latents from one step to the next. At inference every sequence runs exactly
``halt_max_steps`` steps from ``H_init``/``L_init`` and the last step's logits are the output.
Everything is position-local except causal attention, so each stage is causal and a KV cache
with one slot per (ACT step, H cycle, stage, layer) reproduces the full forward exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..config import ModelConfig
from . import recompute
from .layers import Attention, SwiGLU, TiedEmbedding, rms_norm, trunc_normal
from .loss import token_cross_entropy
from .moe import SigmaMoE, SwitchHead, from_reference_names
from .router import Router, RoutingLog, routers

IGNORE_LABEL = -100


class DenseBlock(nn.Module):
    """Attention + SwiGLU. Dense TRM is post-norm; the flat baseline is pre-norm."""

    def __init__(self, args: ModelConfig, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.eps = args.rms_norm_eps
        self.self_attn = Attention(args.hidden_size, args.num_heads, args.rope_theta)
        self.mlp = SwiGLU(args.hidden_size, args.expansion)

    def __call__(self, h: mx.array, cache: Any = None,
                 record: RoutingLog | None = None) -> mx.array:
        if self.pre_norm:
            h = h + self.self_attn(rms_norm(h, self.eps), cache)
            return h + self.mlp(rms_norm(h, self.eps))
        h = rms_norm(h + self.self_attn(h, cache), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class MoEUTBlock(nn.Module):
    """SwitchHead attention + sigma-MoE FFN with MoEUT's norm placement plus a forced post-norm.

    Queries, keys and routers read the normalised residual; values and expert inputs read the
    un-normalised one (the reference's "peri-norm").
    """

    def __init__(self, args: ModelConfig):
        super().__init__()
        self.eps = args.rms_norm_eps
        init_scale = math.sqrt(2.0 / (args.H_cycles * args.L_cycles * args.L_layers))
        balancing = dict(
            bias_balancing=args.moe_bias_balancing,
            bias_update_rate=args.moe_bias_update_rate,
            bias_momentum=args.moe_bias_momentum,
            bias_clip=args.moe_bias_clip,
        )
        self.self_attn = SwitchHead(
            args.hidden_size, args.num_heads, args.moe_att_n_experts, args.moe_att_k,
            init_scale=init_scale, rope_theta=args.rope_theta,
            entropy_coef=args.moe_att_entropy_reg, **balancing,
        )
        self.mlp = SigmaMoE(
            args.hidden_size, args.moe_ff_n_experts, args.moe_ff_expert_size, args.moe_ff_k,
            init_scale=init_scale, entropy_coef=args.moe_entropy_reg, **balancing,
        )

    def __call__(self, h: mx.array, cache: Any = None,
                 record: RoutingLog | None = None) -> mx.array:
        a = rms_norm(h, self.eps)
        h = rms_norm(h + self.self_attn(a, h, cache=cache, record=record), self.eps)
        f = rms_norm(h, self.eps)
        return rms_norm(h + self.mlp(h, f, record=record), self.eps)


def apply_layer(layer: nn.Module, h: mx.array, cache: Any, record: RoutingLog | None,
                checkpoint: bool) -> mx.array:
    """``layer(h, cache, record)``; with ``checkpoint`` the backward pass recomputes the layer's
    activations from its input instead of keeping them (models/recompute.py).

    At 64 x 512 tokens one dense TRM layer application keeps ~0.25 GB for its backward (the
    sigmoid of the 1024-wide SwiGLU gate and, on the CPU, the causal attention weights) and the
    back-propagated cycle has 14 of them; a checkpointed application keeps only its [B, T, D]
    input and output. MoE router logits are
    outputs of the checkpointed function so the record still sees them.
    """
    if not checkpoint or cache is not None:
        return layer(h, cache, record)
    calls: list[tuple[Router, mx.array]] = []

    def run(x: mx.array) -> tuple[mx.array, ...]:
        local = RoutingLog() if record is not None else None
        out = layer(x, None, local)
        entries = local.entries() if local is not None else []
        # The expert indices (integers, no gradient) leave by the side.
        calls[:] = [(router, idx) for router, _, idx in entries]
        return (out, *(logits for _, logits, _ in entries))

    out, *logits = recompute.checkpoint(layer, run)(h)
    if record is not None:
        for (router, idx), router_logits in zip(calls, logits):
            record.add(router, router_logits, idx)
    return out


class ReasoningModule(nn.Module):
    """``L_level``: add the injection, then apply the blocks in order."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = layers

    def __call__(self, z: mx.array, injection: mx.array, caches: Iterator | None = None,
                 record: RoutingLog | None = None, checkpoint: bool = False) -> mx.array:
        h = z + injection
        for layer in self.layers:
            h = apply_layer(layer, h, next(caches) if caches is not None else None, record,
                            checkpoint)
        return h


class Model(nn.Module):
    """The reference's TinyRecursiveReasoningModel_ACTV1 (inner model + ACT wrapper) for text.

    ``model(inputs)`` is the inference forward; training uses :func:`act_step` and
    :func:`act_loss`, which expose the ACT carry.
    """

    def __init__(self, args: ModelConfig):
        super().__init__()
        args.validate()
        self.args = args
        self.model_type = "trm"
        D = args.hidden_size
        self.embed_scale = math.sqrt(D)
        self.embed_tokens = TiedEmbedding(args.vocab_size, D)
        self.q_head = nn.Linear(D, 2, bias=True)
        # q_head starts at "do not halt": zero weight, both logits -5.
        self.q_head.weight = mx.zeros((2, D))
        self.q_head.bias = mx.full((2,), -5.0)
        # Initial latents: buffers (saved with the weights, never trained).
        self.H_init = trunc_normal((D,), 1.0)
        self.L_init = trunc_normal((D,), 1.0)
        if args.flat_transformer:
            self.flat_layers = [DenseBlock(args, pre_norm=True) for _ in range(args.L_layers)]
        else:
            block = (lambda: MoEUTBlock(args)) if args.use_moeut else (
                lambda: DenseBlock(args, pre_norm=False))
            self.L_level = ReasoningModule([block() for _ in range(args.L_layers)])
        self.freeze(keys=["H_init", "L_init"], recurse=False)
        # Recompute the back-propagated layer applications' activations in the backward pass
        # (train.checkpoint_activations); a run-time switch, not part of the architecture.
        self.checkpoint_activations = False

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Weights with the reference's MoE names (older checkpoints) renamed to ours.

        mlx-lm's loader calls this too; weights already in our naming pass through.
        """
        if not self.args.use_moeut:
            return weights
        return from_reference_names(weights)

    @property
    def layers(self) -> list[nn.Module]:
        """The distinct blocks (mlx-lm convention); each is applied many times per forward."""
        return self.flat_layers if self.args.flat_transformer else self.L_level.layers

    @property
    def num_cache_slots(self) -> int:
        """One KV slot per layer application: N_max * H_cycles * (L_cycles + 1) * L_layers."""
        return self.args.halt_max_steps * self.args.layer_applications_per_act_step

    def make_cache(self) -> list:
        """A fresh recursion-aware cache: one stock mlx-lm ``KVCache`` per layer application.

        mlx-lm's batching (``merge`` into its ``BatchKVCache``), prompt-cache files, trimming and
        ``--kv-bits`` then work unchanged (models/cache.py says why one slot per application is
        exact)."""
        return [KVCache() for _ in range(self.num_cache_slots)]

    def initial_latents(self, *batch_shape: int) -> tuple[mx.array, mx.array]:
        """(z_H, z_L) at H_init / L_init for ``batch_shape`` ([B, T], or [B] for rows)."""
        shape = (*batch_shape, self.args.hidden_size)
        return mx.broadcast_to(self.H_init, shape), mx.broadcast_to(self.L_init, shape)

    def inner(self, z_H: mx.array, z_L: mx.array, inputs: mx.array,
              caches: Iterator | None = None, record: RoutingLog | None = None
              ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """One ACT step: refine (z_H, z_L) and read out logits [B,T,V] and q logits [B,2].

        ``caches`` yields one KV slot per layer application, in execution order. ``record``, a
        ``RoutingLog``, collects MoE router calls (entropy regulariser, bias balancing); None in
        eval.
        """
        z_H, z_L = self.refine(z_H, z_L, inputs, caches, record)
        return (z_H, z_L, *self.readout(z_H))

    def refine(self, z_H: mx.array, z_L: mx.array, inputs: mx.array,
               caches: Iterator | None = None, record: RoutingLog | None = None
               ) -> tuple[mx.array, mx.array]:
        """The recursion of one ACT step (no read-out)."""
        args = self.args
        ckpt = self.checkpoint_activations
        x = self.embed_scale * self.embed_tokens(inputs)
        if args.flat_transformer:
            h = x
            for layer in self.flat_layers:
                h = apply_layer(layer, h, next(caches) if caches is not None else None, record,
                                ckpt)
            z_H = z_L = h
        else:
            if args.H_cycles > 1:
                # The reference runs these cycles under torch.no_grad(): only the last cycle is
                # back-propagated, so the latents and the router logits they recorded are cut.
                early = record.detached() if record is not None else None
                for _ in range(args.H_cycles - 1):
                    for _ in range(args.L_cycles):
                        z_L = self.L_level(z_L, z_H + x, caches, early)
                    z_H = self.L_level(z_H, z_L, caches, early)
                z_H, z_L = mx.stop_gradient(z_H), mx.stop_gradient(z_L)
            for _ in range(args.L_cycles):
                z_L = self.L_level(z_L, z_H + x, caches, record, ckpt)
            z_H = self.L_level(z_H, z_L, caches, record, ckpt)
        return z_H, z_L

    def final_norm(self, z_H: mx.array) -> mx.array:
        """The read-out's input: rms_norm first for flat / MoEUT, z_H as is for dense TRM."""
        args = self.args
        if args.use_moeut or args.flat_transformer:
            return rms_norm(z_H, args.rms_norm_eps)
        return z_H

    def logits(self, z_H: mx.array) -> mx.array:
        """The read-out: next-token logits [..., V] from z_H (the tied embedding)."""
        return self.embed_tokens.as_linear(self.final_norm(z_H))

    def readout(self, z_H: mx.array) -> tuple[mx.array, mx.array]:
        """Logits [B,T,V] and q logits [B,2] (read at the first position) from z_H."""
        return self.logits(z_H), self.q_head(self.final_norm(z_H[:, :1])[:, 0])

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """Inference: fresh carry, exactly ``halt_max_steps`` ACT steps, last step's logits.

        A pure forward over whatever cache it is given: with one (``make_cache()``, or the
        decoders' fixed-capacity slots) ``inputs`` continue at the cache's offset (a prompt
        chunk, or one token when decoding) and each layer application reads and extends its
        slot, in execution order.
        """
        B, T = inputs.shape
        if cache is not None and len(cache) != self.num_cache_slots:
            # A cache made for other recursion settings would silently misalign the slots.
            raise ValueError(f"cache has {len(cache)} slots, this model needs "
                             f"{self.num_cache_slots}; make it with model.make_cache()")
        if T == 1 and cache is not None and not self.args.use_moeut:
            # Decoding one position: dense layers take rows [B, D] throughout, so no matmul
            # reshapes its input and back (4 operations fewer in each of 56 layer applications).
            inputs = inputs[:, 0]
        z_H, z_L = self.initial_latents(*inputs.shape)
        caches = iter(cache) if cache is not None else None
        for _ in range(self.args.halt_max_steps):
            z_H, z_L = self.refine(z_H, z_L, inputs, caches)
        # Only the last step's logits are computed: with a 10k vocabulary the read-out is the
        # largest matmul of a step (and q_head is not needed at inference).
        return self.logits(z_H).reshape(B, T, -1)


# ----------------------------------------------------------------------------------------------
# ACT carry and loss (training and the reference's evaluation)


def initial_carry(model: Model, batch_size: int, seq_len: int) -> dict[str, mx.array]:
    """Every row halted, so the first ACT step resets its latents and adopts new data."""
    D = model.args.hidden_size
    return {
        "z_H": mx.zeros((batch_size, seq_len, D)),
        "z_L": mx.zeros((batch_size, seq_len, D)),
        "steps": mx.zeros((batch_size,), dtype=mx.int32),
        "halted": mx.ones((batch_size,), dtype=mx.bool_),
        "inputs": mx.zeros((batch_size, seq_len), dtype=mx.int32),
        "labels": mx.full((batch_size, seq_len), IGNORE_LABEL, dtype=mx.int32),
    }


def act_step(model: Model, carry: dict[str, mx.array], inputs: mx.array, labels: mx.array, *,
             training: bool, record: RoutingLog | None = None, key: mx.array | None = None,
             halt_max_steps: int | None = None
             ) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """One ACT step with the reference's carry semantics.

    Halted rows restart from (H_init, L_init) on the new batch's row; the other rows keep
    refining their old data and the new batch's row is dropped. A row halts after
    ``halt_max_steps`` steps; in training (and only with halt_max_steps > 1) also when
    q_halt > 0, unless exploration drew a larger minimum number of steps for it.
    The caller starts a fresh carry when the batch size changes. ``key`` seeds the exploration
    draw (the global random state when None). ``halt_max_steps`` overrides the model's
    (training's ACT warm-up runs one step per batch).
    """
    args = model.args
    n_max = halt_max_steps or args.halt_max_steps
    halted = carry["halted"]
    row = halted[:, None]
    z_H = mx.where(row[..., None], model.H_init, carry["z_H"])
    z_L = mx.where(row[..., None], model.L_init, carry["z_L"])
    steps = mx.where(halted, 0, carry["steps"])
    inputs = mx.where(row, inputs, carry["inputs"])
    labels = mx.where(row, labels, carry["labels"])

    z_H, z_L = model.refine(z_H, z_L, inputs, record=record)
    hidden = model.final_norm(z_H)
    q_logits = model.q_head(hidden[:, 0])

    steps = steps + 1
    halted = steps >= n_max
    if training and n_max > 1:
        halted = halted | (q_logits[:, 0] > 0)
        B = steps.shape[0]
        k1, k2 = mx.random.split(key) if key is not None else (None, None)
        explore = mx.random.uniform(shape=(B,), key=k1) < args.halt_exploration_prob
        min_halt_steps = explore * mx.random.randint(2, n_max + 1, (B,), key=k2)
        halted = halted & (steps >= min_halt_steps)

    new_carry = {
        "z_H": mx.stop_gradient(z_H),
        "z_L": mx.stop_gradient(z_L),
        "steps": steps,
        "halted": halted,
        "inputs": inputs,
        "labels": labels,
    }
    # "logits" is lazy: MLX computes it only for a caller that reads it. The loss reads
    # "hidden" and the read-out "head" instead and never builds the [B, T, V] logits.
    outputs = {"hidden": hidden, "head": model.embed_tokens,
               "logits": model.logits(z_H),
               "q_halt_logits": q_logits[:, 0], "q_continue_logits": q_logits[:, 1]}
    return new_carry, outputs


def act_loss(outputs: dict[str, Any], labels: mx.array, chunk_rows: int | None = None,
             training: bool = False) -> tuple[mx.array, dict]:
    """The reference ACTLossHead, before division by the global batch size.

    lm = sum over rows of each row's mean token cross-entropy; q_halt is trained toward
    "every label token of the row is predicted exactly"; total = lm + 0.5 * q_halt (lm alone
    for outputs without ``q_halt_logits``, as adaptive evaluation's).
    ``training`` builds the read-out's gradient in the forward pass (one exp per logit instead
    of two): then only ``total`` may be differentiated, as the training step does.
    """
    mask = labels != IGNORE_LABEL
    n_tokens = mask.sum(axis=-1)
    row_weight = mask / mx.maximum(n_tokens, 1)[:, None]
    lm_loss, ce, predicted = token_cross_entropy(outputs, mx.where(mask, labels, 0), row_weight,
                                                 chunk_rows, training)
    ce = ce * mask
    correct = mask & (predicted == labels)
    exact = correct.sum(axis=-1) == n_tokens
    metrics = {"lm_loss": lm_loss}
    total = lm_loss
    if "q_halt_logits" in outputs:  # an ACT step's; a forward without a q head has none
        metrics["q_halt_loss"] = nn.losses.binary_cross_entropy(
            outputs["q_halt_logits"], exact.astype(mx.float32), with_logits=True,
            reduction="sum")
        total = lm_loss + 0.5 * metrics["q_halt_loss"]
    metrics.update({
        "token_ce_sum": ce.sum(),
        "n_tokens": n_tokens.sum(),
        "correct": correct.sum(),
        "exact": exact.sum(),
    })
    return total, metrics


def step_loss(model: Model, carry: dict[str, mx.array], inputs: mx.array, labels: mx.array, *,
              training: bool = False, key: mx.array | None = None,
              halt_max_steps: int | None = None, chunk_rows: int | None = None,
              reg_share: float = 1.0) -> tuple[dict[str, mx.array], mx.array, dict]:
    """The loss of one ACT step: what training differentiates, the memory probe measures and
    evaluation sums. Returns (the new carry, total, metrics, ``metrics["total"]`` included).

    In training an MoE model adds its routers' entropy regulariser, ``reg_share`` of it (a
    micro-batch's or a rank's share of the step's rows), and reports the expert counts for the
    bias update (``metrics["expert_counts"]``).
    """
    record = RoutingLog() if training and model.args.use_moeut else None
    carry, outputs = act_step(model, carry, inputs, labels, training=training, record=record,
                              key=key, halt_max_steps=halt_max_steps)
    total, metrics = act_loss(outputs, carry["labels"], chunk_rows, training)
    if record is not None:
        metrics["moe_reg"] = record.entropy_reg() * reg_share
        metrics["expert_counts"] = record.counts(routers(model))
        total = total + metrics["moe_reg"]
    metrics["total"] = total
    return carry, total, metrics
