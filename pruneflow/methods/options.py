"""Options models of the methods that have options (``score.<method>.*`` in params.yaml). Pydantic only: the
registry and params validation import this without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# The paper's defaults, and ``fast``: sized for a CPU (minutes for the reference model, see BENCHMARKS.md).
BONSAI_PRESETS = {
    "paper": {"prune_frac": 0.05, "sub_models": 200, "n_windows": 32, "rows_per_forward": 32},
    "fast": {"prune_frac": 0.05, "sub_models": 64, "n_windows": 8, "rows_per_forward": 8},
}


class SearchParams(Options):
    """``prune.allocation: search`` (pruneflow.selection.search): a (1 + λ) evolutionary search of per-layer counts."""

    budget: int = Field(128, ge=1, description="candidate allocations evaluated, the starting plan included: "
                                               "one forward pass over the fitness windows each")
    windows: int = Field(8, ge=1, description="calibration windows each candidate's loss is measured on")
    offspring: int = Field(8, ge=1, description="children of the best allocation per generation (λ)")
    seed: int = Field(0, description="seeds the fitness windows and the mutations")


class ExpertDropParams(Options):
    """``expert_drop`` ("Not All Experts are Equal"): every combination of experts is evaluated per layer."""

    max_combinations: int = Field(100_000, ge=1, description="refuse a plan with more combinations per layer than "
                                                               "this (C(experts, removed) grows fast)")


class BonsaiParams(Options):
    """Bonsai's hyper-parameters; ``preset`` fills the ones not given explicitly."""

    preset: Literal["paper", "fast"] = Field(
        "paper", description="defaults for prune_frac, sub_models, n_windows, rows_per_forward")
    prune_frac: float = Field(0.05, gt=0, lt=0.5, description="fraction of the original parameters per iteration")
    sub_models: int = Field(200, ge=4, multiple_of=2, description="sub-models per iteration (draw/complement pairs)")
    n_windows: int = Field(32, ge=1, description="calibration windows each sub-model is scored on")
    prior: Literal["wanda_sp", "magnitude", "random"] = Field("wanda_sp", description="prior for sampling")
    objective: Literal["ppl", "loss"] = Field("ppl", description="sub-model score: −perplexity (paper) or −loss")
    drop_count: Literal["fixed", "varied"] = Field(
        "varied", description="candidates a module drops per draw: int(f·n)+1 (paper) or uniform in 0..all")
    per_parameter: bool = Field(True, description="rank units by importance per parameter removed")
    shrink_to: Literal["zero", "prior"] = Field(
        "prior", description="the lasso shrinks importances towards 0 (paper) or towards the scaled prior")
    cv_folds: int = Field(5, ge=2, description="folds choosing the lasso penalty (Kendall τ)")
    tolerance: float = Field(0.02, ge=0, lt=1, description="stop when the achieved ratio is this close")
    rows_per_forward: int = Field(32, ge=1, description="(sub-model, window) rows per forward pass")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        if isinstance(data, dict):
            preset = BONSAI_PRESETS.get(data.get("preset", "paper"), {})
            data = {**preset, **data}
        return data


class LacoParams(Options):
    """LaCo (layer collapse). Defaults: the released code's interval (1), lowest layer (0) and Llama threshold
    (0.45, its Llama-2-13B notebook); ``merge_layers`` 3 (its Baichuan notebook): one merge removes 2 layers, so
    a ratio is met within one layer on models of 16 layers and more."""

    merge_layers: int = Field(3, ge=2, description="layers folded into one per merge (C: the base and the C − 1 "
                                                   "after it)")
    threshold: float = Field(0.45, gt=-1, lt=1, description="accept a merge while the merged model's last hidden "
                                                            "states keep this cosine to the dense model's (T)")
    interval: int = Field(1, ge=1, description="layers to step down after an accepted merge (I)")
    lowest: int = Field(0, ge=0, description="the lowest layer a merge may start at (L)")
    windows: int = Field(5, ge=1, description="calibration windows the similarity is measured on (the code: 5 "
                                              "sentences)")
    formula: Literal["code", "paper"] = Field(
        "code", description="code: the released notebooks' in-place update θ_base += θ_k − θ_base, which "
                            "telescopes to the top layer's projections (the paper's code, and lower perplexity on "
                            "both reference models, BENCHMARKS.md); paper: θ_base + Σ_k (θ_k − θ_base) (RDSC)")
