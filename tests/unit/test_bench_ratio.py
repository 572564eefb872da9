"""The bench's interleaved ratio: alternating order, the median round, its spread (no video here;
the measured runs are in tests/e2e/test_bench.py)."""

import pytest

from vision_host.bench import interleaved_ratio


def test_rounds_alternate_which_loop_goes_first_and_the_median_round_is_reported():
    calls = []
    plain_fps = iter([100.0, 50.0, 80.0])          # the load changes between rounds…
    pipeline_fps = iter([90.0, 49.0, 40.0])

    def plain():
        calls.append("plain")
        return next(plain_fps)

    def pipeline():
        calls.append("pipeline")
        return next(pipeline_fps)

    result = interleaved_ratio(plain, pipeline, rounds=3)
    assert calls == ["plain", "pipeline", "pipeline", "plain", "plain", "pipeline"]
    # …so each round's ratio is of its own two runs: 0.9, 0.98, 0.5; the median round is 0.9
    assert result == {"fps": 90.0, "opencv_fps": 100.0, "fps_ratio_vs_opencv": 0.9,
                      "fps_ratio_spread": [0.5, 0.98], "fps_ratio_rounds": [0.9, 0.98, 0.5]}


def test_an_even_count_reports_the_lower_median_and_no_round_is_refused():
    result = interleaved_ratio(lambda: 100.0, iter([70.0, 90.0]).__next__, rounds=2)
    assert result["fps_ratio_vs_opencv"] == 0.7 and result["fps_ratio_spread"] == [0.7, 0.9]
    with pytest.raises(ValueError, match="at least 1"):
        interleaved_ratio(lambda: 1.0, lambda: 1.0, rounds=0)
