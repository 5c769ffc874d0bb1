"""MAGIC on a transformer fine-tuning loop: a tiny GPT-2 (built from ``transformers.GPT2Config``, no
download) trained on generated text with frozen token embeddings, ``torch.optim.AdamW`` with two
param groups, a linear warm-up scheduler and gradient clipping; metagradients of the loss of a few
held-out sequences, scored against weight-0 retrains (a single-model LDS) at 1% and 5% drops.

    pip install "seedreg[transformers]"
    python examples/magic_transformer.py

The text is drawn from a fixed random Markov chain over 16 tokens: each training sequence is 12
tokens, and the model learns the chain's transitions. The loop is the one a Hugging Face user
writes by hand; ``magic.metagradient`` takes it as it is (the optimizer object, the scheduler
object, ``max_grad_norm``, dict batches through ``example_losses``).
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from seedreg import SeedSession, lds_score, magic

VOCAB, LENGTH, TRAIN, EPOCHS, BATCH, LR, WARMUP, CLIP = 16, 12, 200, 3, 20, 3e-3, 5, 1.0


def chain_text(n: int, seed: int) -> torch.Tensor:
    """`n` sequences of a Markov chain whose transitions are themselves drawn once (seed 0)."""
    transitions = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)), 1)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, LENGTH, dtype=torch.long)
    out[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, LENGTH):
        out[:, t] = torch.multinomial(transitions[out[:, t - 1]], 1, generator=g)[:, 0]
    return out


class Text(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


TRAIN_IDS, TEST_IDS = chain_text(TRAIN, 1), chain_text(8, 2)


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.transformer.wte.weight.requires_grad_(False)  # frozen token embeddings
    return model


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of each sequence."""
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return per_token.reshape(len(ids), -1).mean(1)


def example_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return sequence_losses(model(input_ids=batch["input_ids"]).logits, batch["input_ids"])


def parts(weights=None):
    """The session, model, loader, optimizer and scheduler of one run (weights: example_weights=)."""
    from transformers import get_linear_schedule_with_warmup

    session = SeedSession(0).setup()
    model = session.build_model(tiny_gpt2, "gpt2").double()
    extra = {} if weights is None else {"example_weights": weights}
    loader = session.build_dataloader(Text(TRAIN_IDS), "train", batch_size=BATCH, shuffle=True, **extra)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=LR)
    scheduler = get_linear_schedule_with_warmup(opt, WARMUP, EPOCHS * len(loader))
    return model, loader, opt, scheduler


def train(weights):
    """The plain fine-tuning loop, each example's loss weighted by `weights`. The model, in eval mode."""
    model, loader, opt, scheduler = parts(weights)
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for batch, w in loader:
            opt.zero_grad()
            (w * example_losses(model, batch)).mean().backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
            opt.step()
            scheduler.step()
    return model.eval()


def test_losses(model: torch.nn.Module, count: int) -> np.ndarray:
    with torch.no_grad():
        return sequence_losses(model(input_ids=TEST_IDS[:count]).logits, TEST_IDS[:count]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, default=4, help="held-out sequences whose loss is attributed")
    parser.add_argument("--subsets", type=int, default=30, help="retrains per drop fraction")
    args = parser.parse_args()
    torch.set_num_threads(1)

    ones = torch.ones(TRAIN, dtype=torch.float64)
    train(ones)  # once to warm up, then timed
    started = time.perf_counter()
    base = test_losses(train(ones), args.targets)
    train_seconds = time.perf_counter() - started

    grads, magic_seconds = [], 0.0
    for j in range(args.targets):
        model, loader, opt, scheduler = parts()
        started = time.perf_counter()
        result = magic.metagradient(
            model, loader, opt, epochs=EPOCHS, example_losses=example_losses, scheduler=scheduler, max_grad_norm=CLIP,
            target=lambda f, j=j: sequence_losses(f(input_ids=TEST_IDS[j : j + 1]).logits, TEST_IDS[j : j + 1])[0])
        magic_seconds += time.perf_counter() - started
        grads.append(result.grad.numpy())
        assert abs(result.target - base[j]) < 1e-9, "the metagradient's run is the plain loop's"
    scores = np.stack(grads, axis=1)  # examples x targets
    print(f"metagradient: {magic_seconds / args.targets:.2f} s a target, {magic_seconds / args.targets / train_seconds:.2f}x "
          f"one training run ({train_seconds:.2f} s), {result.stats['states_kept']} states kept over {result.stats['steps']} steps")

    rng = np.random.default_rng(1)
    for fraction in (0.01, 0.05):
        masks, outputs = [], []
        for _ in range(args.subsets):
            keep = np.ones(TRAIN, dtype=bool)
            keep[rng.choice(TRAIN, size=max(1, round(fraction * TRAIN)), replace=False)] = False
            outputs.append(test_losses(train(torch.from_numpy(keep.astype(np.float64))), args.targets))
            masks.append(keep)
        print(f"single-model LDS at a {fraction:.0%} drop over {args.subsets} weight-0 retrains and {args.targets} held-out "
              f"sequences: {lds_score(scores, np.array(masks), np.array(outputs)):.3f}")


if __name__ == "__main__":
    main()
