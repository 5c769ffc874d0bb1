"""A Hugging Face Trainer run through SeedregTrainer, in a fresh process (tests/test_transformers.py).

    python tests/scripts/hf_train.py OUT [--kill-after STEP] [--resume CKPT] [--workers N] [--replay MANIFEST]

A one-layer BERT built from a config (no download) classifies random token sequences whose tokens
are masked at random in __getitem__ (the per-example streams), with dropout, for 3 epochs of 12
steps, evaluating each epoch and checkpointing every 5 steps (--save-steps) into OUT/. With --kill-after the
process dies (os._exit) right after that step's checkpoint. Writes OUT/weights.bin, OUT/batches.jsonl
(step and a digest of its input ids) and OUT/seedreg-manifest.json.
"""

import hashlib
import json
import os

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

from seedreg import SeedSession
from seedreg.demo import ToyTokens
from seedreg.integrations.transformers import SeedregTrainer
from tests.scripts.framework_run import arguments, weights_bytes

transformers.logging.set_verbosity_error()


class Logged(SeedregTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        digest = hashlib.sha256(inputs["input_ids"].numpy().tobytes()).hexdigest()[:16]
        with open(os.path.join(self.args.output_dir, "batches.jsonl"), "a") as f:
            f.write(json.dumps([self.state.global_step, digest]) + "\n")
        return super().training_step(model, inputs, num_items_in_batch)


class KillAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:  # that step's checkpoint was written when it ended
            os._exit(17)


def main() -> None:
    parser = arguments()
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--trace-every", type=int, help="SeedregTrainer(trace_every=N)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    session = SeedSession.from_manifest(args.replay) if args.replay else SeedSession(2024)
    session.setup()
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2)
    model = session.build_model(lambda: BertForSequenceClassification(config), "model")
    training = TrainingArguments(
        output_dir=str(args.out), per_device_train_batch_size=8, per_device_eval_batch_size=16, num_train_epochs=3,
        learning_rate=1e-3, save_strategy="steps", save_steps=args.save_steps, eval_strategy="epoch", logging_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=args.workers,
    )
    callbacks = [KillAfter(args.kill_after)] if args.kill_after is not None else []
    trainer = Logged(model=model, args=training, train_dataset=ToyTokens(96), eval_dataset=ToyTokens(32), session=session,
                     callbacks=callbacks, trace_every=args.trace_every)
    trainer.train(resume_from_checkpoint=args.resume)
    blob = weights_bytes(model)
    (args.out / "weights.bin").write_bytes(blob)
    result = {"global_step": trainer.state.global_step, "manifest": str(trainer.manifest_path)}
    if args.replay:
        result["verdict"] = session.replay_report()["verdict"]
        result["first_divergence"] = session.replay_report()["first_divergence"]
    (args.out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
