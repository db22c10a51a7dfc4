"""The one replay pipeline (``model.replay``): recorded block inputs replay the model exactly, the
stream read at residual points is the one ``capture`` names, and a pass stops where asked."""

from __future__ import annotations

import pytest
import torch

from prunelens.model.capture import capture
from prunelens.model.replay import Stop, forward_batches, recording_blocks, run_block, run_from, stream_points
from prunelens.testing import N_LAYERS, tiny_lm


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_recorded_inputs_replay_the_model_exactly(arch: str) -> None:
    lm = tiny_lm(arch)
    ad = lm.adapter
    ids = torch.randint(3, 128, (5, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with recording_blocks(ad, inputs_of=range(N_LAYERS)) as calls, capture(ad, [f"resid.{N_LAYERS}"]) as store:
            forward_batches(ad, ids, batch_size=2)
        assert [len(c) for c in calls.inputs] == [len(c) for c in calls.kwargs] == [3] * N_LAYERS  # 3 batches
        last = calls.inputs[0][-1]
        assert torch.equal(run_from(ad, 0, last, [k[-1] for k in calls.kwargs]), store[f"resid.{N_LAYERS}"])
        assert torch.equal(run_block(ad.layers[0], last, calls.kwargs[0][-1]), calls.inputs[1][-1])


def test_stream_points_read_the_named_stream_and_stop_at_the_last() -> None:
    lm = tiny_lm("llama")
    ad = lm.adapter
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    names = {0: "resid.0", 3: "mid.1", 4: "resid.2"}
    with torch.no_grad(), capture(ad, names.values()) as store:
        lm.model(input_ids=ids, use_cache=False)
    got = stream_points(ad, ids, 4, list(names), convert=lambda t: t.detach().clone())
    assert len(got) == 1 and set(got[0]) == set(names)
    for p, name in names.items():
        assert torch.equal(got[0][p], store[name])
    # the pass ended at point 4 (the output of block 1): block 2 never ran
    ran: list[int] = []
    ad.layers[2].register_forward_pre_hook(lambda m, a: ran.append(2))
    stream_points(ad, ids, 4, [4])
    assert not ran


def test_a_recording_can_stop_the_pass_as_a_block_is_entered() -> None:
    lm = tiny_lm("llama")
    ad = lm.adapter
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), recording_blocks(ad, kwargs_of=0, stop_at=0) as calls:
        forward_batches(ad, ids, batch_size=2)
    assert len(calls.inputs[0]) == 2 and not any(calls.kwargs) and not any(calls.inputs[1:])
    with pytest.raises(Stop), torch.no_grad(), recording_blocks(ad, stop_at=1):
        lm.model(input_ids=ids, use_cache=False)  # outside forward_batches the Stop reaches the caller
