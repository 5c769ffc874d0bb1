"""A Hugging Face Trainer run that is seeded, checkpointed, resumed and replayed through seedreg.

    python examples/hf_train.py runs/hf                          # 2 epochs, a checkpoint every 4 steps
    python examples/hf_train.py runs/hf --stop-at 10             # a job stopped early (a time limit, say) ...
    python examples/hf_train.py runs/hf --resume                 # ... resumes from its last checkpoint: the same weights
    python examples/hf_train.py runs/replay --replay runs/hf/seedreg-manifest.json

A one-layer BERT built from a config (nothing downloaded) classifies random token sequences whose
tokens are masked at random in ``__getitem__`` (``seedreg.demo.ToyTokens``). Each run prints the final weights' fingerprint; a
resumed run prints the one the uninterrupted run printed, and a replay prints its verdict. To sweep
seeds, change ``SeedSession(seed)``: ``TrainingArguments(seed=...)`` is not used (and refused).
"""

import argparse
import pathlib

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

from seedreg import SeedSession, fingerprint
from seedreg.demo import ToyTokens
from seedreg.integrations.transformers import SeedregTrainer

transformers.logging.set_verbosity_error()


class StopAt(TrainerCallback):
    """Ends training after step `step` (as a job's time limit would), after its checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--stop-at", type=int, help="end training after this step")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")
    parser.add_argument("--replay", help="a manifest to replay and verify")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the thread count changes CPU float results: keep it fixed across runs

    session = (SeedSession.from_manifest(args.replay) if args.replay else SeedSession(42)).setup()
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2)
    model = session.build_model(lambda: BertForSequenceClassification(config), "model")
    training = TrainingArguments(
        output_dir=str(args.out), num_train_epochs=2, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=1e-3, save_strategy="steps", save_steps=4, eval_strategy="epoch", logging_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = SeedregTrainer(model=model, args=training, train_dataset=ToyTokens(96), eval_dataset=ToyTokens(32),
                             session=session, callbacks=[StopAt(args.stop_at)] if args.stop_at else [])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"steps: {trainer.state.global_step}")
    print(f"final weights: {fingerprint(model)}")
    print(f"manifest: {trainer.manifest_path}")
    if args.replay:
        print(f"verdict: {session.replay_report()['verdict']}")


if __name__ == "__main__":
    main()
