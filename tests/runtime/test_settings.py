"""runtime.settings: flags > CHORUS_* environment > env file > defaults, read the same way
by every command, and passed to the children as the flags they always took."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime import cli
from runtime.errors import ConfigError
from runtime.settings import FLAGS, Settings, env_example, from_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CHORUS_* variable or .env.sidecar of the machine leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("CHORUS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _parse(*argv: str) -> Settings:
    args = cli.build_parser().parse_args(list(argv))
    return from_args(args)


def test_a_flag_beats_the_environment_which_beats_the_env_file_which_beats_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "chorus.env"
    env_file.write_text("CHORUS_SINK=8\nCHORUS_WINDOW=500\nCHORUS_GATEWAY_PORT=7001\n")
    monkeypatch.setenv("CHORUS_WINDOW", "600")
    monkeypatch.setenv("CHORUS_GATEWAY_PORT", "7002")
    settings = _parse("launch", "--env-file", str(env_file), "--port", "7003")
    assert settings.gateway_port == 7003  # flag
    assert settings.window == 600  # environment over the file
    assert settings.sink == 8  # file over the default
    assert settings.engine_idle_s == 900  # default


def test_the_namespace_carries_the_winners_so_flags_keep_their_meaning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHORUS_ENGINE", "false")
    monkeypatch.setenv("CHORUS_GATEWAY_ALLOW_ORIGIN", "http://a.test, http://b.test")
    args = cli.build_parser().parse_args(["launch", "--rate-limit", "5/s"])
    from_args(args)
    assert args.no_engine is True
    assert args.allow_origin == ["http://a.test", "http://b.test"]
    assert args.rate_limit == "5/s"
    assert (args.host, args.port, args.max_body) == ("127.0.0.1", 8600, 65536)
    assert args.data_dir == Path("data") and args.debug is False


def test_repeated_allow_origin_flags_replace_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHORUS_GATEWAY_ALLOW_ORIGIN", "http://env.test")
    settings = _parse("serve", "--allow-origin", "http://x.test", "--allow-origin", "http://y.test")
    assert settings.gateway_allow_origin == ["http://x.test", "http://y.test"]


def test_env_sidecar_in_the_working_directory_is_read_when_present(tmp_path: Path) -> None:
    assert _parse("serve").gateway_port == 8600
    (tmp_path / ".env.sidecar").write_text("CHORUS_GATEWAY_PORT=8700\nCHORUS_MODEL=\n")
    settings = _parse("serve")
    assert settings.gateway_port == 8700
    assert settings.model is None  # an empty value is unset


def test_chorus_env_file_names_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere.env").write_text("CHORUS_DATA_DIR=/srv/chorus\n")
    monkeypatch.setenv("CHORUS_ENV_FILE", str(tmp_path / "elsewhere.env"))
    assert _parse("tail").data_dir == Path("/srv/chorus")


def test_other_programs_lines_in_the_env_file_are_left_alone(tmp_path: Path) -> None:
    env_file = tmp_path / "shared.env"
    env_file.write_text("TZ=UTC\nCHORUS_SINK=2\n")
    assert Settings.load(env_file)[0].sink == 2


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("CHORUS_SINKS=8\n", "CHORUS_SINKS"),  # a typo is not silently ignored
        ("CHORUS_SINK=many\n", "CHORUS_SINK"),
        ("CHORUS_DEVICE=tpu\n", "CHORUS_DEVICE"),
        ("CHORUS_GATEWAY_PORT=70000\n", "CHORUS_GATEWAY_PORT"),
    ],
)
def test_a_bad_env_file_is_a_config_error_naming_the_variable(
    tmp_path: Path, content: str, named: str
) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text(content)
    with pytest.raises(ConfigError, match=named):
        Settings.load(env_file)


def test_a_missing_env_file_given_on_purpose_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "nope.env")


def test_the_cli_reports_a_bad_setting_in_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHORUS_WINDOW", "wide")
    assert cli.main(["settings"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad setting") and "CHORUS_WINDOW" in err
    assert "Traceback" not in err


def test_launch_hands_the_settings_to_the_broker_and_engine_as_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHORUS_MAX_BYTES", "2048")
    monkeypatch.setenv("CHORUS_LOG_REDACT", "true")
    monkeypatch.setenv("CHORUS_ENGINE_THREADS", "2")
    monkeypatch.setenv("CHORUS_GATE_IDLE_S", "5")
    settings = _parse("launch", "--window", "300", "--device", "cpu")
    broker, engine, controller = cli.child_flags(settings)
    assert broker == (
        "--max-bytes", "2048", "--log-retain-days", "14.0", "--log-retain-mb", "1024.0", "--log-redact",
    )  # fmt: skip
    assert engine == (
        "--device", "cpu", "--sink", "4", "--window", "300", "--threads", "2", "--idle-s", "900.0",
    )  # fmt: skip
    # and the children take them: the broker's and the engine's parsers accept every one
    cli.build_parser().parse_args(["broker", *broker])
    from engine.__main__ import build_parser as engine_parser

    engine_parser().parse_args(["serve", *engine])
    assert controller == ("--min-gap-s", "4.0", "--idle-s", "5.0", "--coalesce-s", "0.3")
    from orchestrator.__main__ import main as orchestrator_main

    with pytest.raises(SystemExit):  # parses every flag, then --help ends it
        orchestrator_main(["controller", *controller, "--help"])


def test_every_flag_mapped_to_a_setting_exists_on_launch_or_serve() -> None:
    parser = cli.build_parser()
    dests = set(vars(parser.parse_args(["launch"]))) | set(vars(parser.parse_args(["serve"])))
    assert set(FLAGS.values()) <= dests
    assert set(FLAGS) <= set(Settings.model_fields)


def test_env_sidecar_example_lists_exactly_the_settings_at_their_defaults() -> None:
    text = (REPO / ".env.sidecar.example").read_text()
    assert text == env_example(), (
        "run `python -m runtime settings --env-example > .env.sidecar.example`"
    )
    names = [
        line.split("=", 1)[0] for line in text.splitlines() if line and not line.startswith("#")
    ]
    assert names == [Settings.env_name(name) for name in Settings.model_fields]
    example = REPO / ".env.sidecar.example"
    assert Settings.load(example)[0] == Settings()  # the example changes nothing
