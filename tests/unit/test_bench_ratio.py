"""The bench's interleaved ratio: plain runs either side of each pipeline run, the median round, its spread (no video here;
the measured runs are in tests/e2e/test_bench.py)."""

import pytest

from vision_host.bench import interleaved_ratio


def test_each_pipeline_run_is_set_against_the_plain_runs_either_side_and_the_median_round_is_reported():
    calls = []
    plain_fps = iter([100.0, 80.0, 60.0, 40.0])      # the load grows steadily…
    pipeline_fps = iter([81.0, 35.0, 46.0])

    def plain():
        calls.append("plain")
        return next(plain_fps)

    def pipeline():
        calls.append("pipeline")
        return next(pipeline_fps)

    result = interleaved_ratio(plain, pipeline, rounds=3)
    assert calls == ["plain", "pipeline", "plain", "pipeline", "plain", "pipeline", "plain"]
    # …so each pipeline run is set against the mean of its neighbours: 81/90, 35/70, 46/50
    assert result == {"fps": 81.0, "opencv_fps": 90.0, "fps_ratio_vs_opencv": 0.9,
                      "fps_ratio_spread": [0.5, 0.92], "fps_ratio_rounds": [0.9, 0.5, 0.92]}


def test_an_even_count_reports_the_lower_median_and_no_round_is_refused():
    result = interleaved_ratio(lambda: 100.0, iter([70.0, 90.0]).__next__, rounds=2)
    assert result["fps_ratio_vs_opencv"] == 0.7 and result["fps_ratio_spread"] == [0.7, 0.9]
    with pytest.raises(ValueError, match="at least 1"):
        interleaved_ratio(lambda: 1.0, lambda: 1.0, rounds=0)
