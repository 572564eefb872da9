"""The numeric settings of `vision-host run` (flags and run files alike) refuse NaN and
infinities, which Python's float() and TOML both accept, with a sentence naming the key."""

import math

import pytest

from vision_host.cli.settings import RUN_KEYS, UsageError, check_numbers

FLOAT_KEYS = [k for k in RUN_KEYS if k.kind is float]
INT_KEYS = [k for k in RUN_KEYS if k.kind is int]


@pytest.mark.parametrize("key", FLOAT_KEYS, ids=[k.name for k in FLOAT_KEYS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", math.nan, math.inf, "1e400"])
def test_a_float_setting_refuses_what_is_not_a_finite_number(key, value):
    name = key.name.replace("_", "-")
    with pytest.raises(UsageError, match=f"^{name} = .*: give a finite number of at least"):
        check_numbers({key.name: value})


@pytest.mark.parametrize("key", INT_KEYS, ids=[k.name for k in INT_KEYS])
@pytest.mark.parametrize("value", [math.nan, math.inf, "nan", 1.5])
def test_a_whole_number_setting_refuses_nan_infinity_and_fractions(key, value):
    with pytest.raises(UsageError, match="give a whole number of at least"):
        check_numbers({key.name: value})


def test_finite_numbers_at_or_above_the_least_value_pass_as_their_kind():
    values = {k.name: str(max(k.least or 0, 1)) for k in FLOAT_KEYS + INT_KEYS}
    check_numbers(values)
    assert all(isinstance(values[k.name], k.kind) and math.isfinite(values[k.name]) for k in FLOAT_KEYS + INT_KEYS)


def test_a_bounded_setting_names_its_range():
    with pytest.raises(UsageError, match=r"^ready-within-s = 86401: give a number from 0.001 to 86400$"):
        check_numbers({"ready_within_s": 86401})
    values = {"ready_within_s": "86400"}
    check_numbers(values)
    assert values["ready_within_s"] == 86400.0
