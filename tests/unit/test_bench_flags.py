"""`vision-host bench`'s flags have bounds: streams, the stand-in server's latency and the soak's
length are refused beyond them (and NaN or infinite latencies) with a sentence, before anything
starts."""

import pytest

from vision_host.cli import build_parser
from vision_host.cli.bench import MAX_LATENCY_MS, MAX_SOAK_FRAMES, MAX_STREAMS


@pytest.mark.parametrize(("args", "message"), [
    (["--streams", str(MAX_STREAMS + 1)], f"{MAX_STREAMS + 1} is more than {MAX_STREAMS}"),
    (["--streams", "0"], "must be greater than 0"),
    (["--latency-ms", "nan"], "nan: give milliseconds from 0 to 60000"),
    (["--latency-ms", "inf"], "inf: give milliseconds from 0 to 60000"),
    (["--latency-ms", "-1"], "-1: give milliseconds from 0 to 60000"),
    (["--latency-ms", str(MAX_LATENCY_MS + 1)], "give milliseconds from 0 to 60000"),
    (["--latency-ms", "soon"], "'soon' is not a number of milliseconds"),
    (["--soak-frames", str(MAX_SOAK_FRAMES + 1)], f"is more than {MAX_SOAK_FRAMES}"),
])
def test_out_of_bounds_flags_are_refused_with_a_sentence(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_bounds_themselves_are_accepted():
    args = build_parser().parse_args(["bench", "--streams", str(MAX_STREAMS), "--latency-ms", "0",
                                      "--soak-frames", str(MAX_SOAK_FRAMES)])
    assert (args.streams, args.latency_ms, args.soak_frames) == (MAX_STREAMS, 0.0, MAX_SOAK_FRAMES)
