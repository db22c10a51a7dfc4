"""Scoring a (possibly modified) model on data. Each task module (``mcq``, ``gsm8k``, ``code``,
``retrieval``, ``perplexity``, ``fidelity``) registers its tasks and data sources itself; ``registry``
looks them up by name (``base.TASKS`` imports every module of this package on first use)."""
