from pathlib import Path

import pytest

from pruneflow.errors import PruneflowError
from pruneflow.params import Params, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_params_yaml_loads():
    for path in ROOT.glob("*.yaml"):
        if path.name == "params.yaml":
            assert isinstance(load_params(path), Params)


@pytest.mark.parametrize("override,message", [
    ("prune.ratio=1.2", "prune.ratio: Input should be less than 1"),
    ("prune.ratio=0", "prune.ratio: Input should be greater than 0"),
    ("prune.ratio=-0.5", "prune.ratio: Input should be greater than 0"),
    ("prune.ratio=.nan", "prune.ratio: Input should be a finite number"),
    ("prune.ratio=abc", "prune.ratio: Input should be a valid number"),
    ("prune.allocation=random", "prune.allocation: Input should be 'uniform' or 'global'"),
    ("prune.units=[mlp, blocks]", "prune.units: units must be a non-empty subset"),
    ("prune.rato=0.3", "prune.rato: Extra inputs are not permitted"),
    ("score.method=obs", "score.method: unknown method 'obs'; available: angular, block_influence, bonsai, flap, magnitude, random, sleb, taylor, wanda_sp"),
    ("calibrate.n_windows=0", "calibrate.n_windows: Input should be greater than or equal to 1"),
    ("prune.round_to=0", "prune.round_to: Input should be greater than or equal to 1"),
    ("score.bonsai.sub_models=7", "score.bonsai.sub_models: Input should be a multiple of 2"),
    ("score.bonsai.prune_frac=0.5", "score.bonsai.prune_frac: Input should be less than 0.5"),
    ("score.bonsai.preset=huge", "score.bonsai.preset: Input should be 'paper' or 'fast'"),
    ("score.bonsai.drop_count=some", "score.bonsai.drop_count: Input should be 'fixed' or 'varied'"),
    ("score.bonsai.sub_modles=8", "score.bonsai.sub_modles: Extra inputs are not permitted"),
])
def test_bad_params_name_the_key(override, message):
    with pytest.raises(PruneflowError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert message in str(err.value)


def test_params_file_that_is_not_yaml(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("prune: [ratio: 0.3\n")
    with pytest.raises(PruneflowError, match="is not valid YAML"):
        load_params(bad)


def test_missing_params_file(tmp_path):
    with pytest.raises(PruneflowError, match="params file .* not found"):
        load_params(tmp_path / "nope.yaml")


def test_shipped_params_yaml_equals_the_model_defaults():
    """`pruneflow prune` without --params uses the model's defaults; they must be what params.yaml says."""
    assert load_params(ROOT / "params.yaml") == Params()


def test_bonsai_presets_fill_only_what_is_not_given():
    fast = load_params(ROOT / "params.yaml", ["score.bonsai.preset=fast", "score.bonsai.sub_models=100"]).score.bonsai
    assert (fast.sub_models, fast.n_windows, fast.rows_per_forward, fast.prune_frac) == (100, 8, 8, 0.05)
    paper = load_params(ROOT / "params.yaml").score.bonsai
    assert (paper.sub_models, paper.n_windows, paper.prune_frac, paper.cv_folds) == (200, 32, 0.05, 5)


def test_bonsai_cannot_score_on_more_windows_than_calibration_has():
    with pytest.raises(PruneflowError, match="score.bonsai.n_windows=32 exceeds calibrate.n_windows=16"):
        load_params(ROOT / "params.yaml", ["score.method=bonsai", "calibrate.n_windows=16"])
