"""seedreg beside dattri: a shuffling seedreg loader is seen as one, and scores in either sign
convention give the same LDS by seedreg's and by dattri's own metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seedreg import SeedSession, lds_score, magic


def test_a_shuffling_loader_is_a_random_sampler_to_tools_and_still_deterministic() -> None:
    s = SeedSession(0).setup()
    shuffled = s.build_dataloader(torch.arange(20.0), "a", batch_size=5, shuffle=True)
    ordered = s.build_dataloader(torch.arange(20.0), "b", batch_size=5, shuffle=False)
    assert isinstance(shuffled.sampler, torch.utils.data.RandomSampler)
    assert not isinstance(ordered.sampler, torch.utils.data.RandomSampler)
    again = SeedSession(0).setup().build_dataloader(torch.arange(20.0), "a", batch_size=5, shuffle=True)
    assert [b.tolist() for b in shuffled] == [b.tolist() for b in again]


def test_scores_in_either_convention_give_the_same_lds() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((30, 50)) < 0.9
    grads = rng.normal(size=(50, 4))  # d loss / d w, seedreg's convention
    outputs = masks @ grads + 0.3 * rng.normal(size=(30, 4))
    as_loss = lds_score(grads, masks, outputs, sign="loss")
    assert as_loss > 0.5
    assert lds_score(-grads, masks, outputs, sign="helpfulness") == as_loss
    assert lds_score(-grads, masks, outputs) == pytest.approx(-as_loss)  # the trap: a missed flip
    with pytest.raises(ValueError, match="`sign` must be one of"):
        lds_score(grads, masks, outputs, sign="influence")
    assert magic.MetagradientResult.__attrs_attrs__.sign.default == "loss"


def test_dattri_warns_about_a_shuffling_seedreg_loader_and_agrees_on_lds() -> None:
    pytest.importorskip("dattri", reason='the attribution extra: pip install -e ".[attribution]"')
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.metric import lds
    from dattri.task import AttributionTask

    x, y = torch.randn(24, 3, generator=torch.Generator().manual_seed(0)), torch.arange(24) % 2
    model = torch.nn.Linear(3, 2)

    def loss_func(params, data):
        xs, ys = data
        xs, ys = (xs.unsqueeze(0), ys.unsqueeze(0)) if xs.dim() == 1 else (xs, ys)
        return F.cross_entropy(torch.func.functional_call(model, params, xs), ys)

    def correct_probability(params, data):
        return torch.exp(-loss_func(params, data))

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    s = SeedSession(0).setup()
    data = torch.utils.data.TensorDataset(x, y)
    for shuffle in (True, False):
        trak = TRAKAttributor(task=task, correct_probability_func=correct_probability, projector_kwargs={"proj_dim": 8})
        loader = s.build_dataloader(data, f"train-{shuffle}", batch_size=8, shuffle=shuffle)
        with pytest.warns(UserWarning, match="shuffling") if shuffle else _no_shuffle_warning():
            trak.cache(loader)
    # dattri's LDS: helpfulness scores against -loss with the kept indices; seedreg's: either sign by name
    rng = np.random.default_rng(1)
    masks = np.stack([rng.permutation(24) < 20 for _ in range(12)])
    grads = rng.normal(size=(24, 3))
    outputs = masks @ grads + 0.2 * rng.normal(size=(12, 3))
    kept = torch.from_numpy(np.stack([np.flatnonzero(m) for m in masks]))
    theirs = float(lds(torch.from_numpy(-grads), (torch.from_numpy(-outputs), kept))[0].mean())
    assert lds_score(grads, masks, outputs, sign="loss") == pytest.approx(theirs, abs=1e-6)
    assert lds_score(-grads, masks, outputs, sign="helpfulness") == pytest.approx(theirs, abs=1e-6)


class _no_shuffle_warning:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
        assert not [w for w in self._seen if "shuffling" in str(w.message)]
