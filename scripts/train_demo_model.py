#!/usr/bin/env python
"""Train the small Mixtral-architecture demo model that ships in offload_engine/demo/.

Real Mixtral weights cannot be downloaded offline, so the package ships a tiny model with the *same* architecture
(8 experts, top-2 routing, GQA attention, RMSNorm, RoPE) and the same checkpoint layout, trained on CPU in ~15
minutes on English web text (C4 sample). It is a toy: it writes English-looking text, not answers.

Example:
    python scripts/train_demo_model.py --seed 0 --steps 600
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

# Sleep instead of spin in OpenMP barriers: on a shared 2-core machine spinning threads starve the working ones
# (measured here: ~6 s/step spinning vs ~2-4 s passive under contention, 0.9 vs 1.1 s when idle). Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared/data/corpus/c4_texts.txt"
DEFAULT_OUT = REPO / "offload_engine/demo"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mixtral's tokenizer
BOS_ID = 1
MAX_CHECKPOINT_BYTES = 20 * 1024 * 1024

# Mixtral-8x7B-Instruct style: "<s>[INST] user [/INST] assistant</s>[INST] user [/INST]"; an optional system message
# is prepended to the first user turn (Mixtral has no system role); roles must alternate.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional "
    "system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def split_corpus(text: str, val_fraction: float = 0.05) -> tuple[str, str]:
    """Hold out the last `val_fraction` of the file (by characters), cut at the next line break so that no
    paragraph is split. tests/test_demo_model.py repeats this rule; keep the two in sync."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    cut = len(text) if newline < 0 else newline + 1
    return text[:cut], text[cut:]


def train_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every string is encodable (no <unk> in practice) and decoding is lossless."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_text.splitlines(keepends=True), trainer=trainer)
    # Like Mixtral's tokenizer, plain encode() prepends <s>; chat templates write <s> themselves and transformers
    # then encodes with add_special_tokens=False, so it is never doubled.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    return tok


def encode(tok: Tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.long)


def unigram_ppl(train_ids: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one smoothed unigram model fitted on the train tokens, on `targets`."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[targets].mean().item())


def val_windows(val_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of <s> + (seq_len - 1) val tokens; every val token is predicted exactly once."""
    n = seq_len - 1
    chunks = [val_ids[i:i + n] for i in range(0, len(val_ids) - n + 1, n)]  # drop the ragged tail
    bos = torch.full((len(chunks), 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, torch.stack(chunks)], dim=1)


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL (nats) over the non-<s> tokens of `windows`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + nll.item(), count + x[:, 1:].numel()
    model.train()
    return total / count


def build_model(args: argparse.Namespace, vocab_size: int) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.expert_width,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=args.seq_len,  # the context it was trained on; longer works but degrades
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # short context: classic theta
        router_aux_loss_coef=args.aux_loss, tie_word_embeddings=False,  # untied like real Mixtral
        bos_token_id=BOS_ID, eos_token_id=2, pad_token_id=None)
    return MixtralForCausalLM(config)


def save_checkpoint(model: MixtralForCausalLM, tok: Tokenizer, out: Path, notes: str) -> int:
    """Write to a sibling temp dir and rename at the end so that a crash never leaves a half-written checkpoint."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = model.to(torch.bfloat16)  # bf16 storage halves the size; config.json then says dtype bfloat16
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=2, max_new_tokens=64)
    model.save_pretrained(tmp)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     add_prefix_space=False, clean_up_tokenization_spaces=False,
                                     model_max_length=model.config.max_position_embeddings,
                                     chat_template=CHAT_TEMPLATE)
    hf_tok.save_pretrained(tmp)
    # transformers 5 writes tokenizer_class "TokenizersBackend" and a separate chat_template.jinja; the classic
    # PreTrainedTokenizerFast class with the template inside tokenizer_config.json (as in Mixtral's own repo) also
    # loads in older transformers and other tools.
    tok_config_path = tmp / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    (tmp / "chat_template.jinja").unlink(missing_ok=True)
    (tmp / "TRAINING.md").write_text(notes)
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    if size > MAX_CHECKPOINT_BYTES:
        raise SystemExit(f"checkpoint is {size / 2**20:.1f} MiB > 20 MiB; left in {tmp}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps; fixes the LR schedule")
    p.add_argument("--max-minutes", type=float, default=30.0,
                   help="safety cap on training time; if hit, training stops early (and is no longer reproducible)")
    p.add_argument("--threads", type=int, default=2, help="fixed so that float reductions, hence results, repeat")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=256, help="keeps bf16 weights under the 20 MB budget")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss", type=float, default=0.01, help="load-balancing loss weight (Mixtral: 0.02)")
    p.add_argument("--eval-every", type=int, default=100)
    args = p.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    text = args.corpus.read_text(encoding="utf-8")
    train_text, val_text = split_corpus(text)

    tok = train_tokenizer(train_text, args.vocab)
    vocab_size = tok.get_vocab_size()
    train_enc = tok.encode(train_text, add_special_tokens=False)
    train_ids, val_ids = torch.tensor(train_enc.ids, dtype=torch.long), encode(tok, val_text)
    # Windows start at paragraph starts so that "<s> + text" looks like what generation sees.
    token_starts = torch.tensor([start for start, _ in train_enc.offsets])
    line_chars = torch.tensor([0] + [m.end() for m in re.finditer("\n", train_text)])
    starts = torch.unique(torch.searchsorted(token_starts, line_chars))
    starts = starts[starts <= len(train_ids) - args.seq_len]  # a full window must fit
    windows = val_windows(val_ids, args.seq_len)
    val_targets = windows[:, 1:].reshape(-1)
    baseline = unigram_ppl(train_ids, val_targets, vocab_size)
    print(f"tokenizer: vocab {vocab_size}; train {len(train_ids):,} tokens ({len(train_text):,} chars), "
          f"val {len(val_targets):,} evaluated tokens; unigram baseline ppl {baseline:.1f}", flush=True)

    model = build_model(args, vocab_size)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    # Linear warmup then cosine decay to 10 %: defined by step count, not wall time, so it is reproducible.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    gen = torch.Generator().manual_seed(args.seed)
    bos = torch.full((args.batch, 1), BOS_ID, dtype=torch.long)
    offsets = torch.arange(args.seq_len - 1)

    model.train()
    t_train = time.time()
    stopped_early = False
    bar = tqdm(range(args.steps), desc="train", mininterval=5, file=sys.stdout)
    for step in bar:
        idx = starts[torch.randint(len(starts), (args.batch,), generator=gen)]
        x = torch.cat([bos, train_ids[idx[:, None] + offsets]], dim=1)
        out = model(input_ids=x, labels=x, output_router_logits=True)  # labels are shifted inside the model
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lm_loss = out.loss.item() - args.aux_loss * out.aux_loss.item()
        bar.set_postfix(loss=f"{lm_loss:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = evaluate(model, windows, args.batch)
            tqdm.write(f"step {step + 1}: train loss {lm_loss:.3f}  val loss {val:.3f}  val ppl {math.exp(val):.1f}  "
                       f"({(time.time() - t_train) / 60:.1f} min)", file=sys.stdout)
        if time.time() - t_train > args.max_minutes * 60:
            stopped_early = True
            tqdm.write(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached", file=sys.stdout)
            break
    bar.close()
    train_minutes = (time.time() - t_train) / 60

    # Report the perplexity of what is shipped: weights rounded to bfloat16 (evaluated in float32).
    val_fp32 = math.exp(evaluate(model, windows, args.batch))
    model = model.to(torch.bfloat16).float()
    val_ppl = math.exp(evaluate(model, windows, args.batch))
    total_minutes = (time.time() - t0) / 60
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    machine = (f"{platform.machine()} {platform.processor() or ''}".strip()
               + f", {os.cpu_count()} CPUs, torch {torch.__version__} with {args.threads} threads, load average at the"
               + " end (1/5/15 min) " + "/".join(f"{x:.1f}" for x in os.getloadavg()))  # shared machines: times vary
    hparams = (f"vocab {vocab_size}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} "
               f"kv heads, 8 experts of width {args.expert_width}, top-2, seq len {args.seq_len}, batch {args.batch}, "
               f"{step + 1} steps, lr {args.lr}, warmup {args.warmup}, weight decay {args.weight_decay}, "
               f"aux loss {args.aux_loss}")
    notes = (f"# Demo model training\n\n"
             f"Trained by `scripts/train_demo_model.py` on the C4 sample `shared/data/corpus/c4_texts.txt` "
             f"(last 5 % held out for validation). A toy: it writes English-looking text, not answers.\n\n"
             f"- command: `{command}`\n- seed: {args.seed}\n- machine: {machine}\n"
             f"- time: {train_minutes:.1f} min training, {total_minutes:.1f} min in all"
             f"{' (stopped early by --max-minutes)' if stopped_early else ''}\n"
             f"- hyperparameters: {hparams}\n"
             f"- parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M, stored in bfloat16\n"
             f"- validation perplexity (bf16 weights): {val_ppl:.1f} (float32 weights: {val_fp32:.1f})\n"
             f"- unigram baseline perplexity (add-one smoothed train frequencies): {baseline:.1f}\n"
             f"- tokens evaluated: {len(val_targets):,} (non-overlapping windows of {args.seq_len - 1} tokens after "
             f"`<s>`; training split {len(train_ids):,} tokens)\n")
    size = save_checkpoint(model, tok, args.out, notes)
    print(f"\nsaved {args.out} ({size / 2**20:.1f} MiB)\n{notes}", flush=True)
    if val_ppl > baseline / 4:
        print(f"WARNING: val ppl {val_ppl:.1f} is above a quarter of the unigram baseline ({baseline / 4:.1f})")


if __name__ == "__main__":
    main()
