"""Studies: thousands of LDS models trained across many jobs, as one auditable study.

A study is a directory in the datamodels layout::

    ROOT/study.json     the definition (validated whenever it is read)
    ROOT/masks.npy      models x examples, bool: row i is model i's training subset
    ROOT/outputs.npy    models x outputs, float32: row i is what model i's run saved
    ROOT/tasks/         each task process's completion log and its index (see ``logs``)
    ROOT/artifacts/     per-model files recorded by digest (``run.artifact(name)``)
    ROOT/locks          byte i is locked while a process trains model i (``locks``)

Jobs are independent processes (a SLURM array, submitit, Ray, or N local processes): each asks
:meth:`Study.models_for` for its share and runs them; :meth:`Study.audit` checks the whole.
Everything random about model i depends only on (study master seed, i): its mask (shared by the
models of one replicate group), its session's seeds, and every global draw inside ``study.run(i)``.

The modules: ``definition`` (study.json and the arrays), ``logs`` (completion records and their
index), ``locks``, ``core`` (:class:`Study`), ``run`` (:class:`StudyRun`) and ``audit``.
"""

from ..lds import lds_score  # re-exported beside the study it scores
from .core import Study, StudyRun
from .definition import StudyError

__all__ = ["Study", "StudyError", "StudyRun", "lds_score"]
