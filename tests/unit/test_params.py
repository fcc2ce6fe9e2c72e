from pathlib import Path

import pytest

from pruneflow.errors import PruneflowError
from pruneflow.methods import METHODS
from pruneflow.pipeline.params import Params, load_params

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
    ("prune.allocation=random", "prune.allocation: Input should be 'auto', 'uniform', 'global' or 'search'"),
    ("prune.units=[layers]", "prune.units: method flap scores heads, channels, not layers; depth methods"),
    ("score.method=sleb", None),  # units: auto means the method's own (layers)
    ("runtime.device=gpu", "runtime.device: use auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("runtime.workers=0", "runtime.workers: use local, a number of workers (1 or more), auto or ray://HOST:PORT"),
    ("runtime.workers=ray://head", "runtime.workers: use local, a number of workers"),
    ("runtime.workers=2", None),  # YAML reads 2 as a number: the count params.yaml documents
    ("runtime.dtype=int8", "runtime.dtype: Input should be 'auto', 'bfloat16', 'float16' or 'float32'"),
    ("prune.units=[mlp, blocks]", "prune.units: units must be a non-empty subset"),
    ("prune.rato=0.3", "prune.rato: Extra inputs are not permitted"),
    ("score.method=obs", f"score.method: unknown method 'obs'; available: {', '.join(sorted(METHODS))}"),
    ("calibrate.n_windows=0", "calibrate.n_windows: Input should be greater than or equal to 1"),
    ("prune.round_to=0", "prune.round_to: Input should be greater than or equal to 1"),
    ("score.bonsai.sub_models=7", "score.bonsai.sub_models: Input should be a multiple of 2"),
    ("score.bonsai.prune_frac=0.5", "score.bonsai.prune_frac: Input should be less than 0.5"),
    ("score.bonsai.preset=huge", "score.bonsai.preset: Input should be 'paper' or 'fast'"),
    ("score.bonsai.drop_count=some", "score.bonsai.drop_count: Input should be 'fixed' or 'varied'"),
    ("score.bonsai.sub_modles=8", "score.bonsai.sub_modles: Extra inputs are not permitted"),
    ("export.formats=[safetensors]", "export.formats.0: Input should be 'gguf', 'onnx' or 'vllm'"),
    ("export.dtype=q4", "export.dtype: Input should be 'auto', 'f32', 'f16' or 'bf16'"),
    ("export.quantize=[q3_k]", "export.quantize.0: Input should be 'q8_0', 'q6_k', 'q5_k_m' or 'q4_k_m'"),
    ("export.quantize=[q8_0]", "export: quantize: q8_0 quantizes the GGUF export: add gguf to export.formats"),
])
def test_bad_params_name_the_key(override, message):
    if message is None:
        load_params(ROOT / "params.yaml", [override])
        return
    with pytest.raises(PruneflowError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert message in str(err.value)


@pytest.mark.parametrize("override, whole", [
    ("score.method=obs", f"score.method: unknown method 'obs'; available: {', '.join(sorted(METHODS))}"),
    ("prune.units=[subblocks]", "prune.units: method flap scores heads, channels, not subblocks; use units: "
                                "[heads, channels] (or auto) with it"),
])
def test_a_message_says_its_key_and_the_value_once(override, whole):
    """No ", got 'obs'" after a message that quotes the value, no "(root): " before a check across fields that
    names its own."""
    with pytest.raises(PruneflowError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert str(err.value) == whole


def test_a_worker_count_or_a_byte_count_in_yaml_is_that_number():
    runtime = load_params(ROOT / "params.yaml", ["runtime.workers=2", "runtime.max_memory=1000000000"]).runtime
    assert runtime.workers == "2" and runtime.max_memory == "1000000000"
    with pytest.raises(PruneflowError, match="runtime.workers: Input should be a valid string"):
        load_params(ROOT / "params.yaml", ["runtime.workers=true"])


def test_method_and_units_are_checked_together_before_any_model_is_loaded():
    with pytest.raises(PruneflowError, match="prune.units: method block_influence scores layers, subblocks, not channels"):
        load_params(None, ["score.method=block_influence", "prune.units=[channels]"])
    with pytest.raises(PruneflowError, match="prune.allocation: bonsai removes units globally"):
        load_params(None, ["score.method=bonsai", "prune.allocation=uniform", "calibrate.n_windows=64"])
    bonsai = load_params(None, ["score.method=bonsai"]).prune.for_method("bonsai")
    assert (bonsai.allocation, bonsai.units) == ("global", ["heads", "channels"])
    flap = load_params(None, ["score.method=flap"]).prune.for_method("flap")
    assert (flap.allocation, flap.reconstruct) == ("global", "bias")  # FLAP's code: AL-AM, bias compensation
    wanda = load_params(None, ["score.method=wanda_sp"]).prune.for_method("wanda_sp")
    assert (wanda.allocation, wanda.reconstruct) == ("uniform", "none")
    assert load_params(None, ["score.method=angular"]).prune.for_method("angular").units == ["layers"]


def test_the_old_unit_name_mlp_still_reads_as_channels():
    assert load_params(None, ["prune.units=[mlp, heads]"]).prune.units == ["channels", "heads"]


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


def test_shipped_params_yaml_spells_out_every_parameter():
    """params.yaml is the one source of parameters, read by DVC as written: every field is in it, with its
    value, but the bonsai keys its preset fills (given, they would override the preset)."""
    import yaml

    from pruneflow.methods.options import BONSAI_PRESETS

    preset_keys = {f"score.bonsai.{key}" for preset in BONSAI_PRESETS.values() for key in preset}
    written = yaml.safe_load((ROOT / "params.yaml").read_text())

    def missing(defaults: dict, given: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in defaults.items():
            if key not in given:
                out.append(prefix + key)
            elif isinstance(value, dict):
                out += missing(value, given[key], f"{prefix}{key}.")
        return out

    assert preset_keys and sorted(set(missing(Params().model_dump(), written)) - preset_keys) == []


def test_bonsai_presets_fill_only_what_is_not_given():
    fast = load_params(ROOT / "params.yaml", ["score.bonsai.preset=fast", "score.bonsai.sub_models=100"]).score.bonsai
    assert (fast.sub_models, fast.n_windows, fast.rows_per_forward, fast.prune_frac) == (100, 8, 8, 0.05)
    paper = load_params(ROOT / "params.yaml").score.bonsai
    assert (paper.sub_models, paper.n_windows, paper.prune_frac, paper.cv_folds) == (200, 32, 0.05, 5)


def test_bonsai_cannot_score_on_more_windows_than_calibration_has():
    with pytest.raises(PruneflowError, match="score.bonsai.n_windows=32 exceeds calibrate.n_windows=16"):
        load_params(ROOT / "params.yaml", ["score.method=bonsai", "calibrate.n_windows=16"])


def test_every_fixed_vocabulary_is_a_choice_in_the_prefect_form():
    """The run form is built from the flow's parameter schema: a field with a fixed set of values must carry an
    enum there (a <select> in the UI), never be a free text field."""
    from prefect.utilities.callables import parameter_schema

    from pruneflow.flows.deployments import load_flow
    from pruneflow.methods import METHODS
    from pruneflow.pipeline.params import LORA_TARGETS

    schema = parameter_schema(load_flow("flows/pipeline.py:pipeline").fn).model_dump()["definitions"]

    def choices(model, field):
        prop = schema[model]["properties"][field]
        options = [prop, *prop.get("anyOf", []), prop.get("items", {})]
        options += [o.get("items", {}) for o in prop.get("anyOf", [])]
        return {v for o in options for v in o.get("enum", []) + ([o["const"]] if "const" in o else [])}

    assert choices("ScoreParams", "method") == set(METHODS)
    assert choices("PruneParams", "allocation") == {"auto", "uniform", "global", "search"}
    assert choices("PruneParams", "reconstruct") == {"auto", "none", "bias", "lstsq"}
    assert choices("PruneParams", "head_mode") == {"auto", "query", "group"}
    assert choices("PruneParams", "units") == {"auto", "heads", "channels", "layers", "hidden", "experts", "subblocks", "merged_layers"}
    assert choices("RuntimeParams", "dtype") == {"auto", "bfloat16", "float16", "float32"}
    assert choices("RecoverParams", "targets") == set(LORA_TARGETS)
    assert choices("BonsaiParams", "preset") >= {"paper", "fast"}
    assert choices("ExportParams", "formats") == {"gguf", "onnx", "vllm"}
    assert choices("ExportParams", "dtype") == {"auto", "f32", "f16", "bf16"}
    from pruneflow.model.quantize import QUANT_TYPES

    assert choices("ExportParams", "quantize") == set(QUANT_TYPES)  # the form offers what the quantizer takes
