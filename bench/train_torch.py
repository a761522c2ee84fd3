"""Training throughput of the same Llama-style models in PyTorch: the peer for `slm bench --train`.

Same shapes, same initialisation scheme, same AdamW (betas 0.9/0.95, weight decay 0.1 on
matrices only), gradient clipping at 1.0, fp32 on CPU, random tokens, tied embeddings. Attention
is written out (q @ k^T, causal mask, softmax, @ v) as nanoGPT's non-flash path does, so "eager"
means what it says; --compile wraps the model in torch.compile.

    python bench/train_torch.py --shape tiny --threads 2 --steps 5 [--compile] [--json]
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {
    # d_model, layers, heads, ffn, ctx, batch
    "tiny": (256, 4, 4, 688, 256, 16),
    "small": (512, 8, 8, 1376, 512, 8),
}
VOCAB = 8192


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(ctx, hd, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(ctx, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def rope(x, cos, sin):
    # Half-rotation layout (Hugging Face Llama), as slm uses for its safetensors models.
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.gate = nn.Linear(d, ffn, bias=False)
        self.up = nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, d = x.shape
        hd = d // self.heads
        h = self.attn_norm(x)
        split = lambda y: y.view(b, t, self.heads, hd).transpose(1, 2)
        q = rope(split(self.q(h)), cos, sin)
        k = rope(split(self.k(h)), cos, sin)
        v = split(self.v(h))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, d, layers, heads, ffn, ctx):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        cos, sin = rope_tables(ctx, d // heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        mask = torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)
        # GPT-2 initialisation, residual projections scaled by 1/sqrt(2 * layers).
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.embed(idx)
        cos, sin, mask = self.cos[:t], self.sin[:t], self.mask[:t, :t]
        for blk in self.blocks:
            x = blk(x, cos, sin, mask)
        logits = self.norm(x) @ self.embed.weight.t()  # tied embeddings
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, layers, heads, ffn, ctx, batch_size = SHAPES[args.shape]
    model = Llama(d, layers, heads, ffn, ctx)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
    )
    step_fn = torch.compile(model) if args.compile else model

    def batch():
        toks = torch.randint(0, VOCAB, (batch_size, ctx + 1))
        return toks[:, :-1], toks[:, 1:]

    r = time_updates(lambda x, y: step_fn(x, y), model.parameters(), opt, batch, args)
    r = {
        "engine": "pytorch-compile" if args.compile else "pytorch-eager",
        "shape": args.shape,
        "parameters": sum(p.numel() for p in model.parameters()),
        **r,
    }
    report(r, batch_size * ctx, args)


def time_updates(loss_fn, params, opt, batch, args):
    """`args.warmup` untimed updates, then `args.steps` timed ones: the median seconds of each
    phase (forward, backward, clipping and AdamW) and of the whole update."""
    params = list(params)
    fwd, bwd, upd, total = [], [], [], []
    loss = None
    for i in range(args.warmup + args.steps):
        x, y = batch()
        t0 = time.perf_counter()
        loss = loss_fn(x, y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t3 = time.perf_counter()
        if i >= args.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
            total.append(t3 - t0)
    med = lambda v: sorted(v)[len(v) // 2]
    return {
        "step_s": med(total),
        "forward_s": med(fwd),
        "backward_s": med(bwd),
        "optimizer_s": med(upd),
        "final_loss": float(loss.detach()),
    }


def report(r, tokens_per_step, args):
    """Prints `r` with the fields every peer script reports, as JSON or as a table."""
    r = {
        **r,
        "torch": torch.__version__,
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "tokens_per_s": tokens_per_step / r["step_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": args.threads,
    }
    if args.json:
        print(json.dumps(r))
    else:
        for k, v in r.items():
            print(f"{k:15} {v}")


if __name__ == "__main__":
    main()
