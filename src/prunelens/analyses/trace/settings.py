"""What a trace measures and how its results.json reads: the settings, the schema and the conventions.

Kept apart from the computation so the figures, the page and other analyses can read a saved trace
without importing the model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunelens.errors import PrunelensError
from prunelens.prune.drop import LAYER_INDEXING

# the schema string predates the name "trace"; saved runs and readers rely on it, so it stays
SCHEMA = "prunelens.analysis/1"
# what every version of it starts with: how a saved run is recognised as a trace
SCHEMA_FAMILY = "prunelens.analysis"

CONVENTIONS = {
    "h": "final-norm output (input of the LM head), so z = lm_head(h)",
    "z": "output logits of the model; cos_zc is the cosine of mean-centred logits (shift-invariant like p)",
    "p": "softmax(z / T) for each temperature T",
    "kl": "KL(p_pruned || p_dense), natural log",
    "rkl": "KL(p_dense || p_pruned)",
    "dz": "z_pruned - z_dense",
    "taylor_kl": "Var_{p_dense}(dz) / (2 T^2)",
    "taylor_cos": "Var_r(dz) / (2 T^2), r proportional to p_dense^2; estimates 1 - cos(p)",
    "var_topk": "variance of dz over the top-k dense tokens, equal weights",
    "layer_index": "layerwise index l: residual stream before block l (0 = embeddings); "
                   "l = n_layers is the last block's output, before the final norm",
    "logit_lens": "z_l = lm_head(final_norm(h_l)) at the last prompt token (no logit soft-capping)",
    "drop_indices": LAYER_INDEXING,
    "step": "decoding step t = 1..N: the distribution of the t-th generated token; step 1 is "
            "the last prompt position",
    "teacher_forced": "pruned model fed the dense model's greedy tokens",
    "free_running": "each model fed its own greedy tokens",
    "valid_steps": "teacher-forced steps count until the dense model has emitted EOS; "
                   "free-running steps until either model has",
}


@dataclass
class TraceSettings:
    temperatures: tuple[float, ...] = (1.0,)
    max_new_tokens: int = 32
    batch_size: int = 8
    topk: int = 10
    chat_template: bool = True
    logit_lens: bool = True
    seed: int = 0

    def validate(self) -> None:
        if not self.temperatures:
            raise PrunelensError("at least one temperature is needed")
        for t in self.temperatures:
            if not (t > 0 and math.isfinite(t)):
                raise PrunelensError(f"temperature must be positive, got {t}")
        if self.max_new_tokens < 1:
            raise PrunelensError(f"--steps must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise PrunelensError(f"--batch-size must be at least 1, got {self.batch_size}")


# the former name (notebooks, benchmarks and some tests still use it)
AnalysisSettings = TraceSettings
