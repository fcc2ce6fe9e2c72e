"""Every number README.md quotes for the main job is the committed result file's, formatted as README writes it:
a re-run that changes a result fails here until the README says the new one."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])"
CONFIGURATION = {"64", "256", "30", "8", "200", "2"}  # windows, seqlen, ratio %, LoRA rank/batch, steps, "2-core"


def _results(name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / name).read_text())


def _main_job_paragraph() -> str:
    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks as spaces
    start = readme.index("The main job is `pruneflow run`")
    return readme[start:readme.index("### Installing it as a package")]


def _flap_30(rows: list[dict], model: str, allocation: str, reconstruct: str) -> float:
    (row,) = [r for r in rows if Path(r["model"]).name == model and r["method"] == "flap" and r["ratio"] == 0.3
              and r["allocation"] == allocation and r["reconstruct"] == reconstruct and r["seed"] == 0]
    return row["test_ppl"]


def _main_job() -> list[str]:
    (row,) = [r for r in _results("mainjob.json")["rows"] if r["model"] == "reference" and r["variant"] == "defaults"]
    names, seconds = ("dense", "pruned", "recovered"), row["seconds"]
    task = lambda t: " / ".join(f"{row[k]['tasks'][t]:.3f}" for k in names)  # noqa: E731
    return [f"commit {row['commit']}",
            "test perplexity dense {:.2f} → pruned {:.2f} → recovered {:.2f}".format(*(row[k]["test_ppl"]
                                                                                    for k in names)),
            f"next sentence {task('pruneflow_next_sentence')} and word order {task('pruneflow_word_order')}",
            "all gates passed" if row["gates_passed"] else "gates failed",
            f"the stages took {seconds['calibrate']:.1f} s (calibrate), {seconds['score'] + seconds['prune']:.1f} s "
            f"(score + prune), {seconds['recover']:.1f} s (recovery) and {seconds['evaluate']:.1f} s (evaluate)"]


def _fresh_clone() -> list[str]:
    from benchmarks.fresh_clone import summary

    (row,) = _results("fresh_clone.json")["rows"]
    return [f"from a fresh clone took {summary(row)}", f"`benchmarks/fresh_clone.json`, commit {row['commit']}"]


def _search_and_rerun() -> list[str]:
    rows = _results("reconstruct.json")["rows"]
    best = {m: _flap_30(rows, m, "search", "lstsq") for m in ("reference", "reference-deep")}
    default = {m: _flap_30(rows, m, "global", "bias") for m in ("reference", "reference-deep")}
    rerun = _results("startup.json")["warm_rerun_temporary_server"]["median"]
    return [f"reaches {best['reference']:.2f} instead of {default['reference']:.2f} at 30% "
            f"({best['reference-deep']:.2f} vs {default['reference-deep']:.2f} on the deep model",
            f"{rerun:.2f} s median with Prefect's temporary server"]


@pytest.mark.parametrize("phrases", [_main_job, _fresh_clone, _search_and_rerun])
def test_the_main_job_figures_are_the_committed_results(phrases):
    text = _main_job_paragraph()
    for phrase in phrases():
        assert phrase in text, phrase


def test_no_number_in_the_main_job_paragraph_goes_unchecked():
    """Each number in the paragraph is one of the checked phrases' or a configuration value of params.yaml."""
    checked = {n for phrases in (_main_job, _fresh_clone, _search_and_rerun) for p in phrases()
               for n in re.findall(NUMBER, p)}
    unchecked = set(re.findall(NUMBER, _main_job_paragraph())) - checked - CONFIGURATION
    assert unchecked == set()
