"""A metagradient on a CUDA model, with the states on the host and on the device (tests/test_cuda.py):
prints the SHA-256 of each metagradient and of the trained weights."""

import hashlib
import json

import torch
import torch.nn.functional as F

from seedreg import SeedSession, fingerprint, magic
from seedreg.demo import TinyCNN, ToyImages


def losses(model, batch):
    x, y = batch
    return F.cross_entropy(model(x.cuda()), y.cuda(), reduction="none")


def one(offload):
    session = SeedSession(0).setup()
    model = session.build_model(TinyCNN, "net").cuda()
    loader = session.build_dataloader(ToyImages(64), "train", batch_size=16, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = next(iter(torch.utils.data.DataLoader(ToyImages(8, augment=False), batch_size=8)))
    result = magic.metagradient(model, loader, opt, epochs=2, example_losses=losses, offload=offload,
                                target=lambda f: F.cross_entropy(f(x.cuda()), y.cuda(), reduction="none"))
    return {"grad": hashlib.sha256(result.grad.cpu().numpy().tobytes()).hexdigest(), "weights": fingerprint(result.model),
            "shape": list(result.grad.shape), "device": str(result.grad.device)}


if __name__ == "__main__":
    print(json.dumps({"host": one(True), "device": one(False)}))
