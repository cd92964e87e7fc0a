"""The planner's command line: `tandem up --planner true` with the planner's flags, `tandem planner`
and `tandem profile`, flags and TANDEM_* variables, and the settings' validation."""

from __future__ import annotations

import os

import pytest

from cluster.cli import _parser
from cluster.planner.settings import PlannerServiceSettings, PlannerSettings, ProfileSettings
from cluster.up_settings import UpSettings
from common.settings import settings_from_args


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TANDEM_"):
            monkeypatch.delenv(name)


def test_up_takes_the_planner_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_LATENCY_QUANTILE", "0.95")
    args = _parser().parse_args(["up", "--decode", "2", "--planner", "true", "--itl-target-s", "0.02",
                                 "--max-decode-workers", "3", "--capacity-profile", "p.json"])
    up, planner = settings_from_args(UpSettings, args), settings_from_args(PlannerSettings, args)
    assert up.planner and up.decode == 2
    assert (planner.itl_target_s, planner.latency_quantile, planner.capacity_profile) == (0.02, 0.95, "p.json")
    assert planner.bounds("decode").max == 3 and planner.bounds("prefill").min == 1
    assert settings_from_args(UpSettings, _parser().parse_args(["up"])).planner is False
    with pytest.raises(ValueError, match="aggregated"):
        UpSettings(planner=True, both=1)


def test_planner_and_profile_commands() -> None:
    args = _parser().parse_args(["planner", "--prometheus-url", "http://prom:9090", "--prometheus-selector",
                                 'namespace="tandem"', "--kube-namespace", "tandem", "--cooldown-s", "120"])
    settings = settings_from_args(PlannerServiceSettings, args)
    assert (settings.prometheus_url, settings.kube_namespace, settings.cooldown_s) == ("http://prom:9090", "tandem",
                                                                                       120.0)
    assert (settings.prefill_deployment, settings.decode_deployment) == ("prefill", "decode")
    with pytest.raises(ValueError, match="observations"):
        settings_from_args(PlannerServiceSettings, _parser().parse_args(["planner"]))
    profile = settings_from_args(ProfileSettings, _parser().parse_args(
        ["profile", "--address", "h:1", "--decode-batches", "8, 1,2", "--via", "worker"]))
    assert profile.batches == [1, 2, 8] and profile.via == "worker"
    with pytest.raises(ValueError, match="decode_batches"):
        ProfileSettings(address="h:1", decode_batches="0,4")
    with pytest.raises(SystemExit):
        _parser().parse_args(["profile"])  # --address is required
