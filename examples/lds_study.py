"""An LDS study across jobs: each task trains its share of the models; when all are done, an LDS
for a simple attribution is computed from the study's masks and outputs.

    # four local processes on one study (any number of tasks, any machine count)
    for k in 0 1 2 3; do python examples/lds_study.py --root runs/study --task $k --num-tasks 4 & done; wait
    python examples/lds_study.py --root runs/study --score          # LDS once every model is done
    seedreg study audit runs/study

On a cluster, examples/slurm/lds_array.sbatch runs the same script as a SLURM job array (the task
comes from SLURM_ARRAY_TASK_ID and the array's MIN, MAX and STEP, so --array=1-16 or 0-30:2 work
as written); examples/lds_study_submitit.py and examples/lds_study_ray.py run the same models with
submitit and Ray. Model i trains in ``study.run(i)``:
its mask, initialisation, data order and dropout depend only on (master seed, i), so it gives
the same bytes in any task split, or retrained alone.
"""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from seedreg import Study, lds_score

EXAMPLES, TARGETS, DIM = 200, 16, 8


def data():
    """A fixed, generated binary classification problem (no download)."""
    rng = np.random.Generator(np.random.PCG64(7))
    teacher = rng.normal(size=DIM)
    x = rng.normal(size=(EXAMPLES + TARGETS, DIM)).astype(np.float32)
    y = ((x @ teacher + 0.5 * rng.normal(size=len(x))) > 0).astype(np.int64)
    return torch.from_numpy(x[:EXAMPLES]), torch.from_numpy(y[:EXAMPLES]), torch.from_numpy(x[EXAMPLES:]), torch.from_numpy(y[EXAMPLES:])


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.1)
        self.fc = torch.nn.Linear(DIM, 2)

    def forward(self, x):
        return self.fc(self.drop(x))


def train_one(run, train_set, tx, ty, epochs):
    session = run.session
    loader = session.build_dataloader(train_set, "train", batch_size=32, shuffle=True, subset=run.mask)
    model = session.build_model(Net, "net")
    optimizer = session.build_optimizer(torch.optim.SGD, model.parameters(), "net", lr=0.5)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(tx)
    margins = logits.gather(1, ty[:, None]).squeeze(1) - logits.gather(1, (1 - ty)[:, None]).squeeze(1)
    session.record_result("final_weights", model)
    return margins


def share_this_folder():
    """Tasks that an engine starts in other processes (submitit, Ray) import this module too."""
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))


def open_study(root, seed=42, models=12, alpha=0.5, replicates=1):
    return Study(root, master_seed=seed, num_models=models, num_examples=EXAMPLES, alpha=alpha,
                 num_outputs=TARGETS, replicates=replicates)


def train_model(study, model_id, epochs=5, redo=False):
    """Model `model_id` of `study`, trained and saved: the unit every engine (a local loop, a SLURM
    array, submitit, Ray) runs. Its bytes depend only on (master seed, model_id)."""
    x, y, tx, ty = data()
    with study.run(model_id, redo=redo) as run:
        margins = train_one(run, torch.utils.data.TensorDataset(x, y), tx, ty, epochs)
        run.save(margins)
    print(f"model {model_id}: {int(run.mask.sum())} examples, mean margin {float(margins.mean()):+.4f}, "
          f"weights {run.session.results[0]['value']}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="runs/study")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--models", type=int, default=12)
    p.add_argument("--replicates", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--task", type=int, help="this task's number (default: from the SLURM job array, or SEEDREG_TASK)")
    p.add_argument("--num-tasks", type=int, help="the number of tasks (default: from the SLURM job array, or SEEDREG_NUM_TASKS)")
    p.add_argument("--ids", help="train exactly these model ids, e.g. 7 or 3,7 (retraining alone)")
    p.add_argument("--score", action="store_true", help="train nothing; print the LDS of the finished study")
    args = p.parse_args()
    torch.set_num_threads(1)

    study = open_study(args.root, args.seed, args.models, args.alpha, args.replicates)
    x, y, tx, ty = data()
    if not args.score:
        ids = [int(i) for i in args.ids.split(",")] if args.ids else study.models_for(args.task, args.num_tasks)
        for model_id in ids:
            train_model(study, model_id, args.epochs, redo=bool(args.ids))
        return 0
    status = study.status()
    if status["missing"]:
        print(f"{status['missing']} of {status['models']} models are not done yet; run the remaining tasks first.")
        return 1
    # a simple attribution: a label-signed linear kernel between training examples and targets
    signs = (2 * y - 1).double()
    scores = (signs[:, None] * (x.double() @ tx.double().T) * (2 * ty - 1).double()[None, :]).numpy()
    score = lds_score(scores, study.masks(), study.outputs(), replicates=args.replicates)
    print(f"LDS of the kernel attribution over {status['models']} models and {TARGETS} targets: {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
