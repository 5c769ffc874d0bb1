"""A Lightning fit that is seeded, checkpointed, resumed, continued and replayed through seedreg.

    python examples/lightning_train.py runs/pl                       # 2 epochs; runs/pl/last.ckpt at the end
    python examples/lightning_train.py runs/pl --max-steps 10        # stop early (a time limit, say) ...
    python examples/lightning_train.py runs/pl --resume runs/pl/last.ckpt   # ... and continue: the same weights
    python examples/lightning_train.py runs/replay --replay runs/pl/logs/seedreg-manifest.json

Each run prints the final weights' fingerprint; the run continued from a checkpoint prints the one
the uninterrupted run printed, and a replay prints its verdict (``bitwise`` when every seed, use,
result and environment key agrees). After the fit the script validates and predicts, and the
manifest covers those stages too.
"""

import argparse
import pathlib

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from seedreg import SeedSession, fingerprint
from seedreg.demo import TinyCNN, ToyImages
from seedreg.integrations.lightning import SeedregCallback


class Classifier(pl.LightningModule):
    """Layers and loaders come from the session: their seeds are named, recorded and replayed."""

    def __init__(self, session: SeedSession) -> None:
        super().__init__()
        self.session = session
        self.net = session.build_model(TinyCNN, "net")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0]).argmax(1)

    def configure_optimizers(self):
        return self.session.build_optimizer(torch.optim.SGD, self.parameters(), "opt", lr=0.05, momentum=0.9)

    def train_dataloader(self):  # ToyImages draws random augmentation per example: seeded per example
        return self.session.build_dataloader(ToyImages(96), "train", batch_size=8, shuffle=True)

    def val_dataloader(self):
        return self.session.build_dataloader(ToyImages(32, augment=False), "val", batch_size=16)

    def predict_dataloader(self):
        return self.session.build_dataloader(ToyImages(16, augment=False), "predict", batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (the fit's length stays 2 epochs)")
    parser.add_argument("--resume", help="a checkpoint to continue from (last.ckpt, or one ModelCheckpoint wrote)")
    parser.add_argument("--replay", help="a manifest to replay and verify")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the thread count changes CPU float results: keep it fixed across runs

    session = SeedSession.from_manifest(args.replay) if args.replay else SeedSession(42)
    callback = SeedregCallback(session)  # calls session.setup(): before the model is built
    model = Classifier(session)
    trainer = pl.Trainer(
        max_epochs=2, max_steps=args.max_steps, accelerator="cpu", devices=1, logger=CSVLogger(args.out, name="logs", version=""),
        callbacks=[callback, ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=4, save_top_k=-1)],
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=args.resume)
    trainer.save_checkpoint(args.out / "last.ckpt")  # continue from here with --resume (a longer fit, too)
    trainer.validate(model, verbose=False)
    predictions = torch.cat(trainer.predict(model))
    print(f"steps: {trainer.global_step}")
    print(f"final weights: {fingerprint(model)}")
    print(f"predictions: {predictions.tolist()}")
    print(f"manifest: {callback.manifest_path}")
    if args.replay:
        print(f"verdict: {session.replay_report()['verdict']}")


if __name__ == "__main__":
    main()
