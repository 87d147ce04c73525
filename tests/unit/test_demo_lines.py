"""The demo prints a status line only when something other than the time and the lag moved."""

from __future__ import annotations

from drctl.demo import _news


def test_the_lag_in_any_of_its_forms_is_not_news() -> None:
    tail = " app.dr.test -> 10.0.0.1"
    keys = {_news(f"16:00:0{i} app: healthy       primary=east  lag={lag:<6}{tail}")
            for i, lag in enumerate(["0.05s", "12.05s", "1.20s(last reported)",
                                     "none(no consistent copy)", "none(no replica)",
                                     "unknown"])}
    assert keys == {"app: healthy       primary=east " + tail}, keys
    assert _news(f"16:00:09 app: failed_over   primary=west  lag=none(no replica){tail}") \
        not in keys
