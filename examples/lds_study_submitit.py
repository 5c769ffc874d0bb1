"""An LDS study as a submitit job array: submitit submits the tasks (to SLURM on a cluster, or as
local processes with ``--local``), each task trains its share with ``study.run(i)``; seedreg
schedules nothing.

    python examples/lds_study_submitit.py --root runs/study --tasks 4 --local     # here
    python examples/lds_study_submitit.py --root runs/study --tasks 64 --partition gpu
    seedreg study audit runs/study

The models are the ones examples/lds_study.py trains (same data, same network): the study's
bytes are the same whichever engine ran it. Resubmitting after a failure trains only what is
missing.
"""

import argparse
import pathlib
import sys

import submitit

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # lds_study.py, beside this file
from lds_study import open_study, share_this_folder, train_model  # noqa: E402


def train_task(root: str, task: int, num_tasks: int, models: int, epochs: int) -> list:
    """One array task: the models of task `task` that are not done yet."""
    import torch

    torch.set_num_threads(1)
    study = open_study(root, models=models)
    ids = study.models_for(task, num_tasks)
    for model_id in ids:
        train_model(study, model_id, epochs)
    return ids


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="runs/study")
    p.add_argument("--models", type=int, default=12)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--local", action="store_true", help="run the tasks as local processes (submitit's LocalExecutor)")
    p.add_argument("--partition", help="the SLURM partition (without --local)")
    args = p.parse_args()
    root = str(pathlib.Path(args.root).resolve())
    share_this_folder()
    open_study(root, models=args.models)  # create it once, before the tasks start
    folder = pathlib.Path(root).parent / "submitit-logs"
    executor = submitit.LocalExecutor(folder=folder) if args.local else submitit.AutoExecutor(folder=folder)
    executor.update_parameters(timeout_min=60, **({} if args.local else {"slurm_partition": args.partition, "cpus_per_task": 1}))
    n = args.tasks
    jobs = executor.map_array(train_task, [root] * n, range(n), [n] * n, [args.models] * n, [args.epochs] * n)
    done = [job.result() for job in jobs]  # raises if a task failed, with its traceback
    print(f"{len(jobs)} tasks trained {sum(len(ids) for ids in done)} models")
    report = open_study(root, models=args.models).audit()
    print("audit clean" if report["ok"] else f"audit found problems: {report}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
