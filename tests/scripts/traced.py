"""A traced training run for tests/test_trace.py: record, or replay a manifest, in a fresh process.

    python traced.py OUT.json [--replay MANIFEST] [--strict] [--lr-change-at STEP] [--noise-from STEP]
                              [--every N] [--stop-after STEP] [--resume STATE] [--save-state STATE]
                              [--bn-momentum M] [--assign-shift X] [--no-loss] [--resume-without-trace]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from seedreg import ReplayMismatchError, SeedSession
from seedreg.demo import TinyCNN, ToyImages


class UrandomNoise(torch.nn.Module):
    """Adds noise drawn from os.urandom (no generator seeds it) once switched on."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return x
        noise = torch.frombuffer(bytearray(os.urandom(4 * x.numel())), dtype=torch.int32).float().reshape(x.shape)
        return x + 1e-12 * noise


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TinyCNN()
        self.noise = UrandomNoise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noise(self.body(x))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--replay")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--lr-change-at", type=int)
    p.add_argument("--noise-from", type=int)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--stop-after", type=int)
    p.add_argument("--resume")
    p.add_argument("--save-state")
    p.add_argument("--bn-momentum", type=float)
    p.add_argument("--assign-shift", type=float)
    p.add_argument("--no-loss", action="store_true")
    p.add_argument("--resume-without-trace", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    session = SeedSession.from_manifest(a.replay, strict=a.strict) if a.replay else SeedSession(11)
    session.setup()
    model = session.build_model(Net, "net")
    opt = session.build_optimizer(torch.optim.SGD, model.parameters(), "net", lr=0.05, momentum=0.9)
    loader = session.build_dataloader(ToyImages(96), "net", batch_size=16, shuffle=True)
    if a.bn_momentum is not None:
        model.body.bn.momentum = a.bn_momentum
    trace = session.trace(model, every=a.every)
    if a.assign_shift is not None:  # a checkpoint loaded after trace() with assign=True: new Parameter objects
        model.load_state_dict({k: v + a.assign_shift if v.is_floating_point() else v for k, v in model.state_dict().items()}, assign=True)
        opt = session.build_optimizer(torch.optim.SGD, model.parameters(), "net-assigned", lr=0.05, momentum=0.9)
    step, start_epoch = 0, 0
    if a.resume:
        saved = torch.load(a.resume, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if not a.resume_without_trace:
            trace.load_state_dict(saved["trace"])
        session.load_state_dict(json.loads(saved["session"]))
        step, start_epoch = saved["step"], saved["epoch"]
    try:
        for epoch in range(start_epoch, 2):
            loader.set_epoch(epoch)
            for x, y in loader:
                if a.lr_change_at is not None and step == a.lr_change_at:
                    for group in opt.param_groups:
                        group["lr"] = 0.07
                model.noise.on = a.noise_from is not None and step >= a.noise_from
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                trace.step(step, loss=None if a.no_loss else loss)
                step += 1
                if a.stop_after is not None and step == a.stop_after + 1:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "trace": trace.state_dict(),
                                "session": json.dumps(session.state_dict()), "step": step, "epoch": epoch}, a.save_state)
                    print(json.dumps({"saved": step}))
                    return 0
    except ReplayMismatchError as exc:
        print(json.dumps({"error": str(exc)}))
        return 3
    session.record_result("final_weights", model)
    session.dump(a.out)
    report = session.replay_report() if a.replay else None
    print(json.dumps({"report": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
