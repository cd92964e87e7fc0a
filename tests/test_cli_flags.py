"""Settings dataclasses ↔ command-line flags and TANDEM_* environment variables (common/settings.py), and
the `tandem` CLI's help."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import main
from cluster.router_settings import RouterSettings
from cluster.up_settings import UpSettings
from common.settings import add_settings_flags, env_name, settings_from_args
from worker_runtime.settings import WorkerSettings

REPO = Path(__file__).resolve().parent.parent
SETTINGS = (WorkerSettings, RouterSettings, UpSettings)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TANDEM_* variable of the surrounding shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("TANDEM_"):
            monkeypatch.delenv(name)


def parse(cls: type, argv: list[str]) -> Any:
    parser = argparse.ArgumentParser(prog="t")
    add_settings_flags(parser, cls)
    return settings_from_args(cls, parser.parse_args(argv))


def test_env_name() -> None:
    """A field's variable is TANDEM_ + its upper-cased name."""
    assert env_name("etcd") == "TANDEM_ETCD"
    assert env_name("num_kv_blocks") == "TANDEM_NUM_KV_BLOCKS"


@pytest.mark.parametrize("cls", SETTINGS)
def test_every_field_has_a_flag(cls: type) -> None:
    """Each dataclass field becomes --field-name (underscores → dashes)."""
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, cls)
    flags = {s for action in parser._actions for s in action.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)} <= flags


def test_defaults_give_the_dataclass_defaults() -> None:
    """With only the required flag, the settings equal the dataclass built directly."""
    assert parse(WorkerSettings, ["--etcd", "h:1"]) == WorkerSettings(etcd="h:1")
    assert parse(RouterSettings, ["--etcd", "h:1"]) == RouterSettings(etcd="h:1")
    assert parse(UpSettings, []) == UpSettings()


def test_worker_flags_parse_with_their_types() -> None:
    """int, float, str, `int | None` and Literal flags land in the frozen dataclass with the right types."""
    settings = parse(WorkerSettings, [
        "--etcd", "h:2379", "--role", "prefill", "--grpc-port", "5000", "--num-kv-blocks", "128",
        "--grace-s", "2.5", "--max-model-len", "512", "--dtype", "float32", "--worker-id", "p-1",
        "--kv-backends", "nixl, tcp"])
    assert isinstance(settings, WorkerSettings)
    assert settings.etcd == "h:2379"
    assert settings.role == "prefill" and settings.disaggregated
    assert settings.grpc_port == 5000 and type(settings.grpc_port) is int
    assert settings.num_kv_blocks == 128 and type(settings.num_kv_blocks) is int
    assert settings.max_model_len == 512
    assert settings.grace_s == 2.5 and type(settings.grace_s) is float
    assert settings.dtype == "float32"
    assert settings.worker_id == "p-1"
    assert settings.backends == ("nixl", "tcp")
    assert settings.num_kv_blocks is not None
    assert parse(WorkerSettings, ["--etcd", "h:1"]).num_kv_blocks is None  # `int | None` default
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.role = "decode"  # type: ignore[misc]


def test_router_and_up_flags_parse_with_their_types() -> None:
    """RouterSettings and UpSettings flags: policy choices, floats and counts."""
    router = parse(RouterSettings, ["--etcd", "e:1", "--policy", "round_robin", "--kv-overlap-weight", "0.25",
                                    "--max-inflight", "7", "--http-port", "0"])
    assert (router.policy, router.kv_overlap_weight, router.max_inflight, router.http_port) == (
        "round_robin", 0.25, 7, 0)
    up = parse(UpSettings, ["--prefill", "2", "--decode", "3", "--both", "1", "--num-kv-blocks", "64"])
    assert (up.prefill, up.decode, up.both, up.num_kv_blocks) == (2, 3, 1, 64)


def test_the_hybrid_kv_layout_is_one_setting_for_every_worker_of_a_cluster() -> None:
    """`tandem up --hybrid-kv-cache false` hands the same layout to every worker it starts (prefill and decode
    workers of a model must agree on it: the KV handshake compares it), and a worker's engine takes it."""
    up = parse(UpSettings, ["--prefill", "1", "--decode", "1", "--hybrid-kv-cache", "false"])
    for role in ("prefill", "decode", "both"):
        argv = up.worker_args(role, "e:1")
        assert argv[argv.index("--hybrid-kv-cache") + 1] == "False"
        worker = parse(WorkerSettings, argv[1:])
        assert not worker.hybrid_kv_cache and not worker.engine_config().hybrid_kv_cache
    assert parse(WorkerSettings, ["--etcd", "h:1"]).engine_config().hybrid_kv_cache


@pytest.mark.parametrize(("cls", "argv"), [
    (WorkerSettings, ["--etcd", "h:1", "--role", "router"]),
    (WorkerSettings, ["--etcd", "h:1", "--dtype", "fp16"]),
    (RouterSettings, ["--etcd", "h:1", "--policy", "random"]),
    (UpSettings, ["--policy", "random"]),
    (WorkerSettings, ["--etcd", "h:1", "--grpc-port", "abc"]),
    (WorkerSettings, ["--etcd", "h:1", "--grace-s", "soon"]),
    (WorkerSettings, ["--etcd", "h:1", "--num-kv-blocks", "1.5"]),
])
def test_invalid_flag_values_exit(cls: type, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A Literal value outside its choices, or a malformed number, is an argparse error (SystemExit 2)."""
    with pytest.raises(SystemExit) as exc:
        parse(cls, argv)
    assert exc.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_env_vars_set_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """TANDEM_<FIELD> variables, read when the parser is built, become the defaults, converted to the field type."""
    monkeypatch.setenv("TANDEM_ETCD", "env-host:2379")
    monkeypatch.setenv("TANDEM_ROLE", "decode")
    monkeypatch.setenv("TANDEM_NUM_KV_BLOCKS", "96")
    monkeypatch.setenv("TANDEM_PREFILL_TIMEOUT_S", "4.5")
    settings = parse(WorkerSettings, [])
    assert settings.etcd == "env-host:2379"
    assert settings.role == "decode"
    assert settings.num_kv_blocks == 96 and type(settings.num_kv_blocks) is int
    assert settings.prefill_timeout_s == 4.5 and type(settings.prefill_timeout_s) is float


def test_flag_beats_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag given on the command line wins over its TANDEM_* variable."""
    monkeypatch.setenv("TANDEM_ETCD", "env-host:1")
    monkeypatch.setenv("TANDEM_POLICY", "least_loaded")
    monkeypatch.setenv("TANDEM_GRPC_PORT", "6000")
    settings = parse(RouterSettings, ["--etcd", "flag-host:2", "--policy", "kv_aware"])
    assert (settings.etcd, settings.policy, settings.grpc_port) == ("flag-host:2", "kv_aware", 6000)


def test_required_field_is_required_unless_its_env_var_is_set(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """etcd has no default: without --etcd the parser exits, naming the flag; TANDEM_ETCD satisfies it."""
    with pytest.raises(SystemExit) as exc:
        parse(WorkerSettings, [])
    assert exc.value.code == 2
    assert "--etcd" in capsys.readouterr().err
    monkeypatch.setenv("TANDEM_ETCD", "h:9")
    assert parse(WorkerSettings, []).etcd == "h:9"
    assert parse(RouterSettings, []).etcd == "h:9"


def test_help_names_the_env_var_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """--help shows each flag's TANDEM_* variable and its effective default (the env value when set)."""
    monkeypatch.setenv("TANDEM_MAX_NUM_SEQS", "12")
    parser = argparse.ArgumentParser(prog="t")
    add_settings_flags(parser, WorkerSettings)
    text = " ".join(parser.format_help().split())  # undo line wrapping
    for f in dataclasses.fields(WorkerSettings):
        assert env_name(f.name) in text, f.name
    assert "etcd endpoint host:port (env TANDEM_ETCD; default None)" in text
    assert "(env TANDEM_MAX_NUM_SEQS; default 12)" in text


def test_settings_from_args_applies_overrides_and_ignores_foreign_args() -> None:
    """Keyword overrides beat parsed values; namespace entries that are not fields are ignored."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--command", default="worker")
    add_settings_flags(parser, WorkerSettings)
    settings = settings_from_args(WorkerSettings, parser.parse_args(["--etcd", "h:1"]), grpc_port=7)
    assert settings.grpc_port == 7 and settings.etcd == "h:1"


def test_skip_leaves_fields_to_their_defaults() -> None:
    """Skipped fields get no flag and keep the dataclass default."""
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, WorkerSettings, skip=("role",))
    with pytest.raises(SystemExit):
        parser.parse_args(["--etcd", "h:1", "--role", "decode"])
    assert settings_from_args(WorkerSettings, parser.parse_args(["--etcd", "h:1"])).role == "both"


def test_dataclass_validation_still_applies() -> None:
    """Values argparse accepts but the settings refuse raise the settings' ValueError."""
    with pytest.raises(ValueError, match="lease_ttl_s"):
        parse(WorkerSettings, ["--etcd", "h:1", "--lease-ttl-s", "1"])
    with pytest.raises(ValueError, match="need at least one decode"):
        parse(UpSettings, ["--decode", "0"])


def test_env_var_outside_literal_choices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """TANDEM_DTYPE=fp16 is refused like --dtype fp16 is."""
    monkeypatch.setenv("TANDEM_DTYPE", "fp16")
    with pytest.raises(SystemExit):
        parse(WorkerSettings, ["--etcd", "h:1"])


def test_help_survives_a_percent_in_an_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """--help still works when a variable's value holds '%'."""
    monkeypatch.setenv("TANDEM_CLUSTER", "50%off")
    parser = argparse.ArgumentParser(prog="t")
    add_settings_flags(parser, WorkerSettings)
    assert "50%off" in parser.format_help()


# -- the CLI --------------------------------------------------------------------------------------------
def test_cli_top_level_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`tandem --help` exits 0 and lists the subcommands and the TANDEM_<FLAG> convention (in-process:
    main() appends sys.argv[1:], so the test's own argv is cleared)."""
    monkeypatch.setattr(sys, "argv", ["tandem"])
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("up", "worker", "router", "TANDEM_ETCD", "TANDEM_<FLAG>"):
        assert needle in text, needle


def test_cli_worker_help_runs_as_a_module() -> None:
    """`python -m cluster.cli worker --help` exits 0 and documents --role's choices and the variables (one
    subprocess only: it spends seconds importing the engine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "worker", "--help"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for needle in ("--role", "{prefill,decode,both}", "--etcd", "TANDEM_ETCD", "TANDEM_ROLE", "--num-kv-blocks"):
        assert needle in done.stdout, needle


def test_a_variable_means_the_same_in_every_command() -> None:
    """TANDEM_<FIELD> is read by every command with that field: one name, one type (and choices)."""
    import typing

    from cluster.planner.settings import PlannerServiceSettings, PlannerSettings, ProfileSettings
    from cluster.router_settings import RouterSettings
    from cluster.up_settings import UpSettings

    seen: dict[str, tuple[object, str]] = {}
    for cls in (UpSettings, WorkerSettings, RouterSettings, ProfileSettings, PlannerServiceSettings, PlannerSettings):
        for name, hint in typing.get_type_hints(cls).items():
            if name in seen:
                assert seen[name][0] == hint, f"{name}: {seen[name][1]} has {seen[name][0]}, {cls.__name__} {hint}"
            else:
                seen[name] = (hint, cls.__name__)
