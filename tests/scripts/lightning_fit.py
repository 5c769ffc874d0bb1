"""A Lightning fit through SeedregCallback, in a fresh process (tests/test_lightning.py).

    python tests/scripts/lightning_fit.py OUT [--kill-after STEP] [--resume CKPT] [--workers N] [--replay MANIFEST]

Trains a TinyCNN with dropout on ToyImages (random augmentation from python, numpy and torch) for 3
epochs of 12 batches, validating each epoch, saving a checkpoint every 5 steps (--every) into OUT/ckpt. With
--kill-after the process dies (os._exit) right after the checkpoint of that step is written.
Writes OUT/weights.bin (the final state dict's bytes), OUT/batches.json (the indices of every
batch each step trained on) and the manifest into OUT/logs/.
"""

import json
import os
import pathlib

import torch
import torch.nn.functional as F

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from seedreg import SeedSession
from seedreg.demo import TinyCNN, ToyImages
from seedreg.integrations.lightning import SeedregCallback
from tests.scripts.framework_run import arguments, weights_bytes


class Module(pl.LightningModule):
    def __init__(self, session: SeedSession, workers: int, out: pathlib.Path) -> None:
        super().__init__()
        self.session = session
        self.workers = workers
        self.net = session.build_model(TinyCNN, "net")
        self.log_file = out / ("batches.jsonl" if session.world_size == 1 else f"batches-rank{session.rank}.jsonl")

    def training_step(self, batch, batch_idx):
        indices, (x, y) = batch
        with self.log_file.open("a") as f:
            f.write(json.dumps([self.global_step, indices.tolist()]) + "\n")
        x = F.dropout(x, 0.2)  # the global torch generator, between loader batches
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self.net(F.dropout(x, 0.1, training=True))  # a draw from the global generator at prediction

    def test_dataloader(self):
        return self.session.build_dataloader(ToyImages(24), "test", batch_size=8)

    def predict_dataloader(self):
        return self.session.build_dataloader(ToyImages(20), "predict", batch_size=8)

    def configure_optimizers(self):
        return self.session.build_optimizer(torch.optim.SGD, self.parameters(), "opt", lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return self.session.build_dataloader(ToyImages(96), "train", batch_size=8, shuffle=True, num_workers=self.workers, with_indices=True)

    def val_dataloader(self):
        return self.session.build_dataloader(ToyImages(32), "val", batch_size=16, num_workers=0)


class KillAfter(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:  # the checkpoint of `step` was written at its batch end
            os._exit(17)


def main() -> None:
    parser = arguments()
    parser.add_argument("--ddp", action="store_true", help="under torchrun: DDP over gloo, one process per rank")
    parser.add_argument("--every", type=int, default=5, help="checkpoint every this many steps (0: each epoch)")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--save-at-end", help="trainer.save_checkpoint(PATH) after the fit")
    parser.add_argument("--then", default="", help="stages run after the fit, comma-separated: validate,test,predict")
    parser.add_argument("--trace-every", type=int, help="SeedregCallback(trace_every=N)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    session = SeedSession.from_manifest(args.replay) if args.replay else SeedSession(2024)
    callback = SeedregCallback(session, trace_every=args.trace_every)
    model = Module(session, args.workers, args.out)
    if not args.resume:  # a fresh fit (or a launch tried again) starts the log afresh
        model.log_file.unlink(missing_ok=True)
    every = {"every_n_train_steps": args.every} if args.every else {}  # 0: at the end of each epoch
    callbacks = [callback, ModelCheckpoint(dirpath=args.out / "ckpt", save_top_k=-1, **every)]
    if args.kill_after is not None:
        callbacks.append(KillAfter(args.kill_after))
    ddp = {"strategy": "ddp", "devices": session.world_size, "use_distributed_sampler": False} if args.ddp else {"devices": 1}
    trainer = pl.Trainer(
        max_epochs=args.max_epochs, max_steps=args.max_steps, accelerator="cpu", **ddp, callbacks=callbacks, logger=CSVLogger(args.out / "logs", name="", version=""),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
    )
    trainer.fit(model, ckpt_path=args.resume)
    if args.save_at_end:
        trainer.save_checkpoint(args.save_at_end)
    for stage in filter(None, args.then.split(",")):
        output = getattr(trainer, stage)(model)
        if stage == "predict":
            (args.out / "predictions.bin").write_bytes(b"".join(p.numpy().tobytes() for p in output))
    if torch.distributed.is_initialized():  # gloo can abort a process that exits with its group alive
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    blob = weights_bytes(model)
    (args.out / ("weights.bin" if session.world_size == 1 else f"weights-rank{session.rank}.bin")).write_bytes(blob)
    result = {"manifest": str(callback.manifest_path), "global_step": trainer.global_step}
    if args.replay:
        result["verdict"] = session.replay_report()["verdict"]
        result["first_divergence"] = session.replay_report()["first_divergence"]
    (args.out / ("result.json" if session.world_size == 1 else f"result-rank{session.rank}.json")).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
