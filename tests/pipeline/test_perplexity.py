"""evaluate.perplexity against the definition: exp of the mean next-token cross-entropy over whole windows."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_causal_lm
from pruneflow.evaluation.evaluate import perplexity

STREAM = torch.randint(0, 256, (5 * 16 + 7,), generator=torch.Generator().manual_seed(0))  # 5 windows + a tail


def test_perplexity_is_exp_of_the_mean_cross_entropy_of_the_whole_windows():
    """Five 16-token windows in batches of 2 (the last one short), the 7-token tail dropped: one mean over all
    75 predicted tokens, computed here from the logits of one forward pass."""
    model = tiny_causal_lm()
    windows = STREAM[:80].view(5, 16)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    expected = math.exp(float(F.cross_entropy(logits[:, :-1].reshape(-1, 256), windows[:, 1:].reshape(-1))))
    assert perplexity(model, STREAM, 16, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, STREAM, 16, batch_size=2, max_windows=2) == pytest.approx(
        math.exp(float(F.cross_entropy(logits[:2, :-1].reshape(-1, 256), windows[:2, 1:].reshape(-1)))), rel=1e-6)


def test_a_model_that_predicts_uniformly_has_the_vocabulary_size_as_perplexity():
    model = tiny_causal_lm()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each next token has probability 1/256
    assert perplexity(model, STREAM, 16, batch_size=2) == pytest.approx(256, rel=1e-6)
