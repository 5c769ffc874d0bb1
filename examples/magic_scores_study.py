"""A score matrix for a whole test set from one training run, computed across jobs: the run is
trained once into a store, then the tasks of a seedreg study each compute the metagradients of a
slice of the test set from that store (no task trains again) and save them as artifacts; the
slices gathered are the (test examples x training examples) matrix, scored with an LDS (next to
dattri's TRAK on the same retrains when the attribution extra is installed).

    pip install "seedreg[examples]"       # scikit-learn's digits (and dattri, with [attribution])
    python examples/magic_scores_study.py --store runs/magic --root runs/scores --train
    for k in 0 1; do python examples/magic_scores_study.py --store runs/magic --root runs/scores --task $k --num-tasks 2 & done; wait
    python examples/magic_scores_study.py --store runs/magic --root runs/scores --gather --check

The tasks run anywhere a study runs (local processes as here, a SLURM array, submitit or Ray:
see the studies page); each needs the store's directory, and builds the same run (the same
session seed, model, loader and optimizer), which ``magic.train(..., store=...)`` checks before it
reuses the stored checkpoints. A task killed mid-slice redoes that slice; a finished slice is
never recomputed.
"""

import argparse
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars (tqdm reads it when imported: torch imports it)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from magic_vs_trak import EPOCHS, LR, TRAIN, X_TEST, Y_TEST, parts, per_example, retrains  # noqa: E402

from seedreg import Study, lds_score, magic  # noqa: E402

SLICE = 4  # test examples per study task unit


def trained(store):
    """The run, from its store (trained there by whichever process came first)."""
    model, loader = parts()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return magic.train(model, loader, opt, epochs=EPOCHS, loss=per_example, store=store)


def open_study(root, targets):
    """One study "model" per slice of the test set: its output row is the slice's test losses, its
    artifact the slice's rows of the score matrix."""
    slices = -(-targets // SLICE)
    return Study(root, master_seed=0, num_models=slices, num_examples=TRAIN, alpha=1.0, num_outputs=SLICE)


def slice_target(i, targets):
    lo, hi = i * SLICE, min(targets, (i + 1) * SLICE)
    return lambda f: per_example(f(X_TEST[lo:hi]), Y_TEST[lo:hi])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", default="runs/magic")
    p.add_argument("--root", default="runs/scores")
    p.add_argument("--targets", type=int, default=8, help="test examples attributed (in slices of 4)")
    p.add_argument("--train", action="store_true", help="train the run into the store (once)")
    p.add_argument("--task", type=int)
    p.add_argument("--num-tasks", type=int)
    p.add_argument("--gather", action="store_true", help="assemble the score matrix and print its LDS")
    p.add_argument("--check", action="store_true", help="with --gather: compare with the matrix of one process")
    p.add_argument("--subsets", type=int, default=20, help="weight-0 retrains per drop fraction, with --gather")
    p.add_argument("--trak-seeds", type=int, default=3, help="with --gather and dattri installed: TRAK's models beside ours")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.train:
        print(f"trained: {trained(args.store).stats['trained']}")
        return 0
    study = open_study(args.root, args.targets)
    if not args.gather:
        run_of = trained(args.store)
        for i in study.models_for(args.task, args.num_tasks):
            with study.run(i) as unit:
                result = run_of.metagradient(slice_target(i, args.targets))
                np.save(unit.artifact("scores.npy"), result.grad.numpy())
                row = np.full(SLICE, np.nan, dtype=np.float32)
                row[: len(result.target)] = result.target
                unit.save(torch.from_numpy(row))
            print(f"slice {i}: {tuple(result.grad.shape)} scores, trained here: {run_of.stats['trained']}", flush=True)
        return 0
    status = study.status()
    if status["missing"]:
        print(f"{status['missing']} of {status['models']} slices are not done yet; run the remaining tasks first.")
        return 1
    scores = np.concatenate([np.load(study.artifact(i, "scores.npy")) for i in range(study.num_models)])  # (k, n)
    print(f"score matrix: {scores.shape[0]} test examples x {scores.shape[1]} training examples")
    if args.check:
        whole = trained(args.store).metagradient(lambda f: per_example(f(X_TEST[: args.targets]), Y_TEST[: args.targets]))
        gap = float(np.abs(whole.grad.numpy() - scores).max())
        print(f"largest difference from one process's matrix: {gap:.1e}")
    others = []  # dattri's TRAK on the same test examples, when the attribution extra is installed
    try:
        from magic_vs_trak import dattri_scores

        others = [(f"dattri TRAK ({args.trak_seeds} seeds)", dattri_scores(args.targets, args.trak_seeds)[0])]
    except ImportError:
        print('dattri is not installed (pip install -e ".[attribution]"): the metagradient scores alone')
    rng = np.random.default_rng(1)
    for fraction in (0.01, 0.05):
        masks, outputs = retrains(args.targets, args.subsets, fraction, rng, removal=False)
        print(f"single-model LDS at a {fraction:.0%} drop over {args.subsets} weight-0 retrains: "
              f"{lds_score(scores.T, masks, outputs):.3f}"
              + "".join(f"; {name}: {lds_score(s, masks, outputs, sign='helpfulness'):.3f}" for name, s in others))
    return 0


if __name__ == "__main__":
    sys.exit(main())
