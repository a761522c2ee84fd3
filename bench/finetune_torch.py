"""Fine-tuning throughput of SmolLM2-135M's shape in transformers (+ PEFT): the peer for
`slm bench --train smollm2 [--lora R]`.

transformers' LlamaForCausalLM (its default attention, eager mode: no torch.compile), fp32 on
CPU, random weights and tokens (the speed does not depend on them), sequence 128, batch 16,
AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), gradient clipping at 1.0: of every
weight, or with --lora R of PEFT's LoRA adapters (alpha 2R, no dropout) on all seven
projections of every layer, the base frozen. Timed and reported by bench/train_torch.py's
functions (the same JSON fields).

    python bench/finetune_torch.py --threads 2 --steps 3 [--lora 16] [--json]
"""
import argparse

import torch
import torch.nn.functional as F
from train_torch import report, time_updates
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, CTX, BATCH = 49152, 128, 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=CTX,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    engine = "pytorch-eager"
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ))
        engine = "pytorch-eager+peft"
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() == 2 and "embed" not in n]
    other = [p for n, p in trainable if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
    )

    def batch():
        toks = torch.randint(0, VOCAB, (BATCH, CTX + 1))
        return toks[:, :-1], toks[:, 1:]

    def loss_fn(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    r = time_updates(loss_fn, [p for _, p in trainable], opt, batch, args)
    r = {
        "engine": engine,
        "shape": "smollm2",
        "lora": args.lora or None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for _, p in trainable),
        **r,
    }
    report(r, BATCH * CTX, args)


if __name__ == "__main__":
    main()
