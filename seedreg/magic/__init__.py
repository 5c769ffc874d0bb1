"""MAGIC in a few lines: the metagradient of a target through a whole training run.

MAGIC (Ilyas & Engstrom, 2025) attributes a model's behaviour to its training data by
differentiating a target (a loss on a test example, say) through the whole, deterministic training
run with respect to a weight per training example: the REPLAY algorithm of "Optimizing ML Training
with Metagradient Descent" (Engstrom et al., 2025). :func:`metagradient` trains, keeping
checkpoints on a schedule (:class:`~seedreg.StepCheckpoints`), then walks the steps backwards,
restoring the exact state before each one (parameters, buffers, optimizer state, random
generators) and pulling the adjoint through it::

    session = SeedSession(0).setup()
    model = session.build_model(MLP, "model").double()
    loader = session.build_dataloader(train, "train", batch_size=32, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = magic.metagradient(model, loader, optimizer, epochs=4,
                                loss=lambda out, y: F.cross_entropy(out, y, reduction="none"),
                                target=lambda f: F.cross_entropy(f(x_test), y_test))
    result.grad      # d target / d w_i at w = 1, one per training example

A batch's training loss is ``mean(w[indices] * loss(model(x), y))``. The loop is a plain one:
torch.optim's SGD, Adam or AdamW with param groups (or seedreg's functional ``magic.SGD``,
``magic.Adam``, ``magic.AdamW``), frozen parameters, a scheduler object, clipping, gradient
accumulation and any batch structure (``example_losses=``). BatchNorm's running statistics are
part of the differentiated state (a target evaluated in eval mode depends on them), and dropout
or any other global random draw inside the forward pass is replayed exactly.
"""

from .checkpoints import SCHEDULES, StepCheckpoints
from .metagradient import MetagradientResult, Trained, metagradient, train
from .optimizers import SGD, Adam, AdamW

__all__ = ["Adam", "AdamW", "MetagradientResult", "SCHEDULES", "SGD", "StepCheckpoints", "Trained", "metagradient", "train"]
