"""An LDS study with Ray: one Ray task per model, each ``study.run(i)``; Ray schedules, seedreg
records. Ray's workers are processes that run one task at a time, as a study needs (the global
random state is per process).

    python examples/lds_study_ray.py --root runs/study                  # a local Ray cluster
    python examples/lds_study_ray.py --root runs/study --address auto   # a running cluster
    seedreg study audit runs/study

The models are the ones examples/lds_study.py trains: the same bytes whichever engine ran them.
"""

import argparse
import pathlib
import sys

import ray

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # lds_study.py, beside this file
from lds_study import open_study, share_this_folder, train_model  # noqa: E402


@ray.remote(num_cpus=1)
def train(root: str, model_id: int, models: int, epochs: int) -> int:
    import torch

    torch.set_num_threads(1)
    train_model(open_study(root, models=models), model_id, epochs)
    return model_id


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="runs/study")
    p.add_argument("--models", type=int, default=12)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--address", help="a running Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local cluster")
    args = p.parse_args()
    root = str(pathlib.Path(args.root).resolve())
    share_this_folder()
    study = open_study(root, models=args.models)
    ray.init(address=args.address, num_cpus=None if args.address else args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        done = ray.get([train.remote(root, i, args.models, args.epochs) for i in study.models_for(0, 1)])
    finally:
        ray.shutdown()
    print(f"Ray trained {len(done)} models")
    report = open_study(root, models=args.models).audit()
    print("audit clean" if report["ok"] else f"audit found problems: {report}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
