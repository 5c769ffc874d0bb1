"""A training loop that stops and resumes exactly, with its step trace (the docs' resume page).

    python examples/resume_loop.py --out runs/resume --stop-at 7      # stops mid-epoch 1, saves a checkpoint
    python examples/resume_loop.py --out runs/resume --resume         # a new process continues from it

Run it once without flags too (into another --out): the resumed run ends with the same weights
and writes the same step trace, byte for byte.
"""

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F

from seedreg import SeedSession, fingerprint
from seedreg.demo import TinyCNN, ToyImages

EPOCHS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/resume")
    parser.add_argument("--stop-at", type=int, default=None, help="save a checkpoint after this step and exit")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Build everything exactly as the first run did: same keys, same order.
    session = SeedSession(42).setup()
    model = session.build_model(TinyCNN, "net")
    optimizer = session.build_optimizer(torch.optim.SGD, model.parameters(), "sgd", lr=0.05, momentum=0.9)
    loader = session.build_dataloader(ToyImages(96), "train", batch_size=16, shuffle=True)
    trace = session.trace(model, every=2)
    step = 0

    if args.resume:
        checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        session.load_state_dict(json.loads(checkpoint["seedreg"]))  # registry, generators, the loader's position
        trace.load_state_dict(checkpoint["trace"])  # the steps traced before the stop
        step = trace.last_step or 0

    # loader.epoch is the epoch the loader stands in: a resumed loader continues it at the first
    # batch the stopped run did not take (set_epoch of that same epoch keeps its position).
    for epoch in range(loader.epoch, EPOCHS):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            trace.step(step, loss=loss)
            if step == args.stop_at:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "seedreg": json.dumps(session.state_dict()), "trace": trace.state_dict()},
                           out / "checkpoint.pt")
                print(f"stopped after step {step} (epoch {epoch}); checkpoint: {out / 'checkpoint.pt'}")
                return

    session.record_result("final_weights", model.state_dict())
    session.dump(out / "manifest.json")  # the trace is written beside it: manifest.json.trace
    print(f"finished at step {step}; final weights: {fingerprint(model)}")


if __name__ == "__main__":
    main()
