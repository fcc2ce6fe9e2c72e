"""The benchmark tables: aggregated seeds show each seed's parameter count; rows from another checkout still
find their model's dense row; depth-then-width rows are named alike in every table."""

from benchmarks.report import _aggregate, _params, _reconstruct_table


def _row(seed, params, ppl, model="/a/models/reference", method="random", **extra):
    return {"model": model, "method": method, "ratio": 0.5, "allocation": "global", "seed": seed,
            "reconstruct": "none", "non_embedding_params": params, "test_ppl": ppl, "achieved_ratio": 0.5,
            "peak_rss_mb": 600.0, "prune_seconds": 1.0, **extra}


def test_an_aggregated_row_reports_each_seeds_parameter_count():
    [row] = _aggregate([_row(0, 100, 10.0), _row(1, 104, 12.0), _row(2, 100, 11.0)])
    assert row["seeds"] == 3 and row["test_ppl"] == 11.0
    assert _params(row) == "100 / 104 / 100"
    [same] = _aggregate([_row(0, 100, 10.0), _row(1, 100, 12.0)])
    assert _params(same) == "100 (each seed)"
    assert _params(_row(0, 1234567, 1.0)) == "1,234,567"


def test_reconstruct_rows_from_another_checkout_use_their_models_dense_row():
    dense = _row(0, 200, 5.0, model="/old/checkout/models/reference", method="dense", peak_rss_mb=500.0)
    rows = [dense, _row(0, 100, 9.0, model="/new/models/reference", method="flap"),
            _row(0, 100, 8.0, model="/new/models/reference", method="flap", reconstruct="lstsq")]
    table = _reconstruct_table(rows)
    line = next(line for line in table.splitlines() if "| flap |" in line)
    assert line.endswith("| 1.20 |")  # 600 MB ÷ the dense row's 500 MB
    assert "**8.00**" in line


def test_depth_then_width_rows_read_the_same_in_the_reconstruct_and_encoder_tables():
    from benchmarks.encoder import label

    rows = [_row(0, 100, 9.0, method="flap", depth={"method": "sleb", "blocks": blocks}) for blocks in (1, 2)]
    table = _reconstruct_table(rows)
    for row, text in zip(rows, ("sleb −1 block, then flap", "sleb −2 blocks, then flap")):
        assert f"| {text} |" in table and label(row) == text
