"""The sequential calibration pipeline feeds every linear layer its own, correct statistics."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import prunelens.prune.weights as W
from prunelens.model.arch import Adapter


def _tiny() -> Adapter:
    torch.manual_seed(0)
    # hidden = heads * head_dim, so o_proj's input has the very shape of q/k/v's input
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=8)
    return Adapter(AutoModelForCausalLM.from_config(cfg).eval())


def test_each_linear_gets_the_hessian_of_its_own_input(monkeypatch) -> None:
    ad = _tiny()
    calib = torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}

    def spy(method, w, stats, record):  # record what the pipeline hands to the algorithm
        path = next(p for p, m in ad.model.named_modules() if getattr(m, "weight", None) is not None
                    and m.weight.data.data_ptr() == w.data_ptr())
        seen[path] = stats.hessian().clone()
        return w.clone()

    monkeypatch.setattr(W, "_modify", spy)
    W.sparsify(ad, W.parse_prune("sparsegpt:0.5"), calib, batch_size=4, progress=False)

    # reference: plain hooks on the untouched (spy returns W itself) model, one forward pass
    xs: dict[str, list[torch.Tensor]] = {}
    handles = [ad.model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: xs.setdefault(p, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for ps in W.target_linears(ad) for p in ps]
    with torch.inference_mode():
        for b in range(0, 6, 4):
            ad.model(input_ids=calib[b:b + 4], use_cache=False)
    for h in handles:
        h.remove()
    assert set(seen) == set(xs) and len(seen) == 3 * 7
    for p, chunks in xs.items():
        x = torch.cat(chunks)
        want = 2.0 * x.T @ x / x.shape[0]
        torch.testing.assert_close(seen[p].double(), want, rtol=1e-4, atol=1e-5, msg=p)
